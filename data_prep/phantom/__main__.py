"""`python -m data_prep.phantom`: the command line (`cli`)."""

import sys

from data_prep.phantom import cli

if __name__ == "__main__":
  sys.exit(cli.main())
