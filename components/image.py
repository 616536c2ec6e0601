"""The one setting that names the component images: registry/repository:tag.

    FLEXI_JEST_IMAGE       image of every component (default below)
    FLEXI_JEST_GPU_IMAGE   image of the GPU stages (train_reference, cache_reference, train_learner); default
                           FLEXI_JEST_IMAGE

Read when the pipeline is compiled: `FLEXI_JEST_IMAGE=registry.example.com/team/flexi-jest:0.1.0 python
pipelines/flexi_jest_pp.py compile`. The default's tag is the package version (flexi_jest.__version__): the
image is part of a cached stage's key, so a release with new code never reuses a stage an older one computed.
"""

import os

from flexi_jest import __version__

DEFAULT_IMAGE = f"ghcr.io/flexi-jest/flexi-jest:{__version__}"
IMAGE = os.environ.get("FLEXI_JEST_IMAGE", DEFAULT_IMAGE)
GPU_IMAGE = os.environ.get("FLEXI_JEST_GPU_IMAGE", IMAGE)
