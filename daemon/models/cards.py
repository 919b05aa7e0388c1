"""The card fields (TOML) of each task, said once.

A bundled model and the reference network of the same task share them: input
size and layout, normalisation, class names and colours. A card is these fields
after a provenance line (and, for trained models, the training record).
"""

from __future__ import annotations

WSI_MEAN, WSI_STD = 0.5, 0.25  # of RGB in 0..1; the training code normalises with these

ULTRASOUND = """\
task = "segmentation"

[input]
size = [256, 256]
layout = "NCHW"
channels = 1

[input.normalisation]
scale = 0.00392156862745098

[output]
activation = "softmax"

[[classes]]
name = "background"
colour = [0, 0, 0]
opacity = 0.0

[[classes]]
name = "artery"
colour = [255, 0, 0]
opacity = 0.5

[[classes]]
name = "vein"
colour = [0, 0, 255]
opacity = 0.5
"""

CT = """\
task = "segmentation"

[input]
layout = "NCDHW"
channels = 1

[input.normalisation]
clip = [-1200.0, 400.0]
scale = 0.000625
mean = [-0.75]

[output]
activation = "softmax"

[[classes]]
name = "background"
colour = [0, 0, 0]
opacity = 0.0

[[classes]]
name = "nodule"
colour = [255, 200, 0]
opacity = 0.6
"""

WSI = f"""\
task = "classification"

[input]
size = [512, 512]
layout = "NCHW"
channels = 3

[input.normalisation]
scale = 0.00392156862745098
mean = [{WSI_MEAN}]
std = [{WSI_STD}]

[output]
activation = "softmax"

[[classes]]
name = "normal"
colour = [0, 160, 0]
opacity = 0.4

[[classes]]
name = "benign"
colour = [0, 90, 255]
opacity = 0.4

[[classes]]
name = "in-situ"
colour = [255, 200, 0]
opacity = 0.5

[[classes]]
name = "invasive"
colour = [230, 0, 0]
opacity = 0.5
"""
