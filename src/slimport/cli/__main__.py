"""`python -m slimport.cli`."""

import sys

from slimport.cli import main

sys.exit(main())
