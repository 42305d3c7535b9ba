"""Video-action prediction: the joint loss (observed frames clean, future frames and actions with
their own timesteps), Self-Flow's terms on it, and policy-mode sampling of an action chunk."""

import dataclasses

import torch

from selfflow.backbone.mmdit import MMDiTConfig, build_mmdit
from selfflow.flow.paths import TimestepConfig, interpolate, sample_timesteps
from selfflow.robotics.video_action import Clip, VideoActionConfig, sample_action_chunk, video_action_loss
from selfflow.training.objective import ObjectiveConfig

B, CTX, FUT, H = 3, 4, 4, 3


def model_and_clip(seed=0):
    torch.manual_seed(seed)
    cfg = MMDiTConfig(
        hidden_size=32,
        num_heads=2,
        depth_double=1,
        depth_single=2,
        axes_dim=[4, 6, 6],
        context_dim=0,
        num_classes=0,
        projector_dim=32,
        modalities={"video": [12, 12], "action": [7, 7]},
    )
    model = build_mmdit(cfg)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    g = torch.Generator().manual_seed(seed + 1)

    def frame_ids(first_frame):  # two frames of 2 tokens each: (frame, h, 0, 0)
        ids = torch.zeros(B, 4, 4, dtype=torch.long)
        ids[..., 0] = first_frame + torch.arange(4) // 2
        ids[..., 1] = torch.arange(4) % 2
        return ids

    act_ids = torch.zeros(B, H, 4, dtype=torch.long)
    act_ids[..., 0] = 1 + torch.arange(H)  # action k follows the last observed frame (time 1)
    clip = Clip(
        torch.randn(B, CTX, 12, generator=g),
        torch.randn(B, FUT, 12, generator=g),
        torch.randn(B, H, 7, generator=g),
        frame_ids(0),
        frame_ids(2),
        act_ids,
    )
    return model, clip


def student_of(model):
    def student(x, t, ids, layer):
        if layer is None:
            return model(x, t, ids, modality=("video", "action"))
        out = model.forward_with_features(x, t, ids, modality=("video", "action"), layer=layer)
        return (*out.velocity, out.features)

    return student


def test_flow_matching_loss_matches_a_hand_computed_reference():
    """fm, no policy samples: draws in the documented order (future noise, t_f; action noise, t_a;
    policy coins), observed frames at t = 0, loss = MSE(frames) + MSE(actions)."""
    model, clip = model_and_clip()
    objective = ObjectiveConfig(method="fm")
    cfg = VideoActionConfig(policy_fraction=0.0)
    terms = video_action_loss(objective, cfg, clip, student_of(model), None, torch.Generator().manual_seed(7))

    g = torch.Generator().manual_seed(7)
    noise_f = torch.randn(clip.future.shape, generator=g)
    t_f = sample_timesteps(TimestepConfig("logit_normal"), B, g)
    noise_a = torch.randn(clip.actions.shape, generator=g)
    t_a = sample_timesteps(TimestepConfig("logit_normal"), B, g)
    frames = torch.cat((clip.context, interpolate(clip.future, noise_f, t_f)), dim=1)
    actions = interpolate(clip.actions, noise_a, t_a)
    tau = torch.cat((torch.zeros(B, CTX), t_f[:, None].expand(B, FUT), t_a[:, None].expand(B, H)), dim=1)
    ids = torch.cat((clip.ids_context, clip.ids_future, clip.ids_actions), dim=1)
    v_f, v_a = model((frames, actions), tau, ids, modality=("video", "action"))
    expected = ((v_f[:, CTX:] - (noise_f - clip.future)) ** 2).mean() + ((v_a - (noise_a - clip.actions)) ** 2).mean()
    torch.testing.assert_close(terms.total, expected)
    assert terms.rep == 0


def test_policy_samples_train_actions_only_and_selfflow_adds_the_representation_term():
    model, clip = model_and_clip()
    objective = ObjectiveConfig(method="selfflow", student_layer=1, teacher_layer=2, gamma=0.8)
    teacher_model = build_mmdit(model.cfg)
    teacher_model.load_state_dict(model.state_dict())

    def teacher(x, t, ids, layer):
        return teacher_model.hidden_states(x, t, ids, modality=("video", "action"), layer=layer)

    all_policy = VideoActionConfig(policy_fraction=1.0)
    terms = video_action_loss(objective, all_policy, clip, student_of(model), teacher, torch.Generator().manual_seed(1))
    assert torch.isfinite(terms.total) and terms.rep != 0 and -1 <= terms.rep <= 1  # a mean -cos
    torch.testing.assert_close(terms.total, terms.fm + 0.8 * terms.rep)
    terms.total.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["act_in.weight"].abs().sum() > 0 and grads["final_layer.act_linear.weight"].abs().sum() > 0
    # every sample in policy mode: the future frames' output head gets no flow-matching gradient
    model.zero_grad()
    fm_only = dataclasses.replace(objective, method="fm")
    video_action_loss(
        fm_only, all_policy, clip, student_of(model), None, torch.Generator().manual_seed(1)
    ).total.backward()
    assert model.final_layer.vid_linear.weight.grad.abs().sum() == 0


def test_policy_sampling_returns_a_chunk_that_depends_on_the_observation():
    model, clip = model_and_clip()
    chunk = sample_action_chunk(model.eval(), clip, steps=4, generator=torch.Generator().manual_seed(0))
    assert chunk.shape == (B, H, 7) and torch.isfinite(chunk).all()
    again = sample_action_chunk(model, clip, steps=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(chunk, again)
    other = sample_action_chunk(
        model, clip._replace(context=clip.context + 1), steps=4, generator=torch.Generator().manual_seed(0)
    )
    assert (other - chunk).abs().max() > 1e-4
