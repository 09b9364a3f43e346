"""`python -m s3proxy` is the same as the `s3proxy` console script."""

from s3proxy.cli import main

raise SystemExit(main())
