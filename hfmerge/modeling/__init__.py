"""Model classes hfmerge defines for families that transformers lacks (the MLP and VGG classifiers of OTFusion's settings).

The names below are :mod:`hfmerge.modeling.classic`'s, which must stay self-contained (it is written into saved
repos): its adapters read them here, so that declaring the families imports no model class, and with it none of
transformers' modeling code (``tests/test_classic_families.py`` checks that both agree).
"""

MODELING_FILE = "modeling_hfmerge_classic.py"
"""The modeling file written beside the weights of every MLP and VGG model, which ``auto_map`` names."""
MLP_TYPE = "hfmerge_mlp"
VGG_TYPE = "hfmerge_vgg"
