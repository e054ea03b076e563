"""The package list, derived from the tree: every folder under a mapped root that holds an
__init__.py is a package of the wheel, so a new folder cannot be forgotten (a hand-written list
once left out opd.server.dropin and broke every image). Metadata lives in pyproject.toml;
tests/hygiene/test_packages.py checks that no source folder lacks its __init__.py."""

from setuptools import find_packages, setup

# import namespace -> top-level folder; research (experiments/) and tests stay out of the wheel
ROOTS = {
    "opd.shared": "shared",
    "opd.modeling": "modeling",
    "opd.server": "server",
    "opd.client": "client",
    "opd.bench": "bench",
}

packages = [
    name
    for root, folder in ROOTS.items()
    for name in (root, *(f"{root}.{sub}" for sub in find_packages(folder)))
]

setup(packages=packages, package_dir=ROOTS)
