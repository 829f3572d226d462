"""``cai review``: a local web page over the store to read the AI's labels and record people's verdicts.

Modules: ``queries`` (the SQL behind every view, paged server-side), ``verdicts`` (a person's verdict
as a ``comparisons`` row), ``diffs`` (word diffs between critique rounds), ``files`` (which plot
files may be served), ``app`` (the FastAPI app), ``server`` (uvicorn on 127.0.0.1, store checks),
``static/`` (the page: plain HTML/JS/CSS, no build step, nothing fetched from elsewhere).
"""
