"""``python -m trainer.data.phantom``: a montage and/or a data set (see :func:`.montage.main`)."""

from .montage import main

raise SystemExit(main())
