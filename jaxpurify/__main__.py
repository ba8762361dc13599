"""``python -m jaxpurify ...`` is the ``jaxpurify`` command line."""

from jaxpurify.cli import main

raise SystemExit(main())
