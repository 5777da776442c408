"""``python -m zpar.agent``: the same command as ``zpar-agent``."""

from zpar.cli import agent_main

if __name__ == "__main__":
    agent_main()
