"""Subprocess entry point: ``python -m vpeft.bench.memory_probe JOB_JSON`` prints peak memory."""

import json
import sys

from vpeft.bench.profile import _probe

if __name__ == "__main__":
    print(json.dumps(_probe(json.loads(sys.argv[1]))))
