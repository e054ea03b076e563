"""Every student-side command's typed config, composed of the shared option groups (groups).

These modules import no torch, transformers or vLLM: the CLI builds each command's flags and
help from them before it loads anything heavy (`opd train --help` answers at once), and a
config file or a run's config.json is validated here.
"""
