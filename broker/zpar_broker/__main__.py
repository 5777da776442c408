"""``python -m zpar_broker``: the same command as ``zpar-broker``."""

from zpar.cli import broker_main

if __name__ == "__main__":
    broker_main()
