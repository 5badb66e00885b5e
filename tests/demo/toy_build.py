"""The toy build's options shared by the build tests: 16x16 clips of 13 frames, a first VAE stage on 8x8 x 7."""

TOY = ["--size", "16", "--frames", "13", "--vae_pretrain_size", "8", "--vae_pretrain_frames", "7"]
TOY += ["--object_size", "0.14", "0.22"]  # the shipped 0.20-0.30 leaves no room to move in 8-pixel frames
