"""deepnets: train deep MLPs, skip nets, ResNets and DenseNets from YAML and watch their gradients flow."""

__version__ = "0.1.0"
