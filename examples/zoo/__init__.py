"""Third-party reparameterizable models (timm) as training-time inputs for reparam, nothing downloaded."""
