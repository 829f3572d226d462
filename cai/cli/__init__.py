"""The `cai` command line. Every command calls the same library function a flow or test calls.

`common` holds the root app and the shared helpers; each other module registers the commands of one
concern on it. They are imported here in the order the commands appear in `cai --help`.
"""

import os

# The machines cai runs on are often offline: Prefect's temporary server would otherwise log a failed
# telemetry call every ten minutes. The user's own settings win.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# The import order is the order of the commands in `cai --help`.
# isort: off
from cai.cli import models  # noqa: F401
from cai.cli import db  # noqa: F401
from cai.cli import runs  # noqa: F401
from cai.cli import constitution  # noqa: F401
from cai.cli import constitution_versions  # noqa: F401
from cai.cli import data  # noqa: F401
from cai.cli import preferences  # noqa: F401
from cai.cli import critique  # noqa: F401
from cai.cli import judge  # noqa: F401
from cai.cli import reward  # noqa: F401
from cai.cli import flows  # noqa: F401
from cai.cli import rl  # noqa: F401
from cai.cli import evaluate  # noqa: F401
from cai.cli import refusals  # noqa: F401
from cai.cli import review  # noqa: F401
# isort: on

from cai.cli.common import app, main

__all__ = ["app", "main"]
