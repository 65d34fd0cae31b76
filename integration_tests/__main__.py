"""`python -m integration_tests` (see integration_tests/cli.py and docs/INTEGRATION.md)."""

import sys

from integration_tests.cli import main

sys.exit(main())
