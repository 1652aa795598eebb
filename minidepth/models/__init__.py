"""Neural network components: attention, UNet, autoencoder, text encoder, depth estimator."""
