"""fdfo: Finite Difference Flow Optimization for flow-matching text-to-image models."""

import logging as _logging


class _PilProcessorsAreIntended(_logging.Filter):
    """fdfo preprocesses images with PIL and does not need torchvision (there is no CPU build of it that
    installs beside a CPU torch everywhere). transformers then serves its PIL image processors, as fdfo
    wants, but says so on every run: this drops that one notice and nothing else."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


_logging.getLogger("transformers.utils.import_utils").addFilter(_PilProcessorsAreIntended())
