"""`python -m common.data fetch NAME ... [--data_root DIR]`, the command the data errors name (common.data.fetch)."""
import sys

from common.data.fetch import main

sys.exit(main())
