"""spark-submit's main program for deltavec (in the image: /opt/deltavec/bin/driver.py).

    spark-submit [options] docker/driver.py run --config conf/deltavec.toml

Under spark-submit the master, deploy mode and JARs are spark-submit's, so the
config's ``spark.master`` is set aside (unless DELTAVEC_SPARK__MASTER says
otherwise): an empty master makes the job join the session spark-submit set up.

The file lives outside the package on purpose: spark-submit puts a program's own
folder first on ``sys.path``, and the package folder holds modules (``config``,
``errors``, ``columns``...) whose names would shadow other libraries' modules.
"""

import os
import sys

os.environ.setdefault("DELTAVEC_SPARK__MASTER", "")

from deltavec.cli import main

sys.exit(main())
