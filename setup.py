"""Package discovery only (everything else is in pyproject.toml).

The top-level folders ``passes/``, ``exporters/``, ``models/`` and ``recipes/`` install as
``graphc.passes``, ``graphc.exporters``, ``graphc.models`` and ``graphc.recipe_files``; every
sub-package under them is found here, so that a new one ships without editing a list.
"""

from setuptools import find_packages, setup

MAPPED = {
    "graphc": "graphc",
    "graphc.passes": "passes",
    "graphc.exporters": "exporters",
    "graphc.models": "models",
    "graphc.recipe_files": "recipes",
}

packages = []
for name, folder in MAPPED.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(
    packages=packages,
    package_dir=MAPPED,
    package_data={"graphc.recipe_files": ["*.toml", "builtin/*.toml"]},
)
