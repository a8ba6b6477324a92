"""`python -m hf_fastmtp.cli`, the same as the `fastmtp` command."""

from . import main

if __name__ == "__main__":  # not on a plain import (tests/test_layout.py imports every module)
    main()
