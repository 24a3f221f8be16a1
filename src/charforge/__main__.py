"""``python -m charforge`` runs the command line."""

from charforge.cli import main

main()
