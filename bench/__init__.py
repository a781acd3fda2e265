"""kvkernels bench CLI: ``python -m bench <case> [options]`` (see ``python -m bench --help``)."""
