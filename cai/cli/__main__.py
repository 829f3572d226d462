"""`python -m cai.cli`: the same as the `cai` command."""

from cai.cli import main

main()
