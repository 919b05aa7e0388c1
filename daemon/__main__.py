"""``python -m daemon`` runs the ``echod`` command line."""

from daemon.cli import main

raise SystemExit(main())
