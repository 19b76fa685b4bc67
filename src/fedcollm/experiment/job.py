"""One experiment job in a process of its own (`fedcollm experiment --jobs N` runs N at once):

    python -m fedcollm.experiment.job CONFIG.toml METHOD WORKDIR RESULT.json

Writes the method's result, with the code version of this process, to RESULT.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedcollm import checkpoint
from fedcollm.config import load_config
from fedcollm.experiment.methods import METHODS
from fedcollm.version import code_version


def main(argv: list[str]) -> None:
    config_file, method, workdir, result_file = argv
    result = METHODS[method](load_config(config_file), Path(workdir))
    result.setdefault("code_version", code_version())
    checkpoint.write_json(Path(result_file), result)


if __name__ == "__main__":
    main(sys.argv[1:])
