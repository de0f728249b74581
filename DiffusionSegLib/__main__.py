"""``python -m DiffusionSegLib`` runs the command-line interface."""

from DiffusionSegLib.cli import main

raise SystemExit(main())
