"""Model classes hfmerge defines for families that transformers lacks (the MLP and VGG classifiers of OTFusion's settings)."""
