"""The paper's parts (§2), one module each, and the model that assembles them.

| module | paper |
|---|---|
| :mod:`~kanoclip.modeling.prompts` | KnPL prompts, eq. 1; the training-free state ensemble |
| :mod:`~kanoclip.modeling.vv_attention` | CLIP-VV, eq. 4-8 (all contact with transformers' vision tower) |
| :mod:`~kanoclip.modeling.bicmci` | Bi-CMCI, eq. 9 |
| :mod:`~kanoclip.modeling.adapter` | Conv-Adapter, eq. 11 |
| :mod:`~kanoclip.modeling.maps` | maps and score, eq. 9, 10, 12 |
| :mod:`~kanoclip.modeling.losses` | KD loss eq. 2-3; global, local and joint losses eq. 13-15 |
| :mod:`~kanoclip.modeling.model` | the whole forward pass: :class:`KAnoCLIPModel` (tensors in, tensors out) |

The modules are imported by name (this package imports nothing, so light commands stay light).
Nothing here decodes images, caches or builds results: that is :class:`kanoclip.KAnoCLIP`'s work.
"""
