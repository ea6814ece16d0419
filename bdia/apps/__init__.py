"""The apps: each turns a composed config (or plain arguments) into work and a run folder.

* :mod:`bdia.apps.sample` — images from an EDM-style denoiser (``scripts/sample.py``);
* :mod:`bdia.apps.text2image` — Stable Diffusion text-to-image (``scripts/text2image.py``);
* :mod:`bdia.apps.edit` — inversion and editing of a photo with every method (``scripts/edit.py``);
* :mod:`bdia.apps.reproduce` / :mod:`bdia.apps.tables` — the paper's tables (``scripts/reproduce.py``);
* :mod:`bdia.apps.train` — the embedded digits model (``scripts/train.py``);
* :mod:`bdia.apps.driver` — the sampling driver the first two share; :mod:`bdia.apps.cli` — the Hydra shells' glue.

Apps import the core and the services, never each other's internals; ``docs/design.md`` draws the layers.
"""
