"""`python -m ops`: run the lag monitor with TIDEGATE_* settings."""

from ops.monitor import main

if __name__ == "__main__":
    main()
