"""``python -m DiffusionSegLib`` runs the command-line interface."""

from DiffusionSegLib.cli.main import main

raise SystemExit(main())
