"""The torch.fx front end: capture (symbolic tracing with shapes), import into the IR, export back to a
GraphModule, and ``reparam.fuse``."""
