"""Tiny random configs of the diffusers autoencoders, shared by the modality and prepare tests."""

TINY_2D = dict(  # AutoencoderKL and AutoencoderKLFlux2: 2 blocks -> 2x downsampling
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=16,
)
WAN_MEAN, WAN_STD = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]
TINY_WAN = dict(  # Wan2.2-like: residual blocks, 2x2 pixel patch (12 input channels); 4x time, 8x space
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 2, 2],
    num_res_blocks=1,
    temperal_downsample=[True, True],
    is_residual=True,
    in_channels=12,
    out_channels=12,
    patch_size=2,
    scale_factor_spatial=8,
    latents_mean=WAN_MEAN,
    latents_std=WAN_STD,
)
TINY_OOBLECK = dict(  # hop 2 * 4 = 8, 4 latent channels (encoder_hidden_size / 2), stereo 48 kHz
    encoder_hidden_size=8,
    downsampling_ratios=[2, 4],
    channel_multiples=[1, 2],
    decoder_channels=8,
    decoder_input_channels=4,
    audio_channels=2,
    sampling_rate=48000,
)
