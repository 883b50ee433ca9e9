"""Print README.md's configuration table from the schema: `python tools/config_table.py`."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from liteppo_mcore.config.docs import config_table  # noqa: E402

if __name__ == "__main__":
    print(config_table())
