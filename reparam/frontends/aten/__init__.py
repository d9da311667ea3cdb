"""The torch.export front end: ATen graphs are FX graphs, read with the FX importer plus ATen recognizers."""
