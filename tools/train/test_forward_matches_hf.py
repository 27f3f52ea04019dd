#!/usr/bin/env python3
"""Checks tools/train/model.py against transformers' DeepSeek-V3 on the same weights.

1. Main model: our state_dict (HF names, per-expert weights) is saved as float32 safetensors
   with export.py's config.json; transformers' DeepseekV3ForCausalLM.from_pretrained loads it
   (converting per-expert weights to its fused tensors; no key may be missing) and its logits
   must equal ours. Nonzero e_score_correction_bias, norm weights and YaRN rope are exercised.
2. MTP module: transformers has none, so the reference is assembled from transformers' own
   pieces (DeepseekV3RMSNorm for enorm/hnorm/shared_head.norm, DeepseekV3DecoderLayer,
   DeepseekV3RotaryEmbedding, nn.Linear eh_proj/head) loaded with our MTP weights.
3. FP8 export: block quantization round trip within e4m3's rounding bound, and its layout.
4. The committed models: the BF16 export loads in transformers unchanged and gives our
   logits; the FP8 export dequantizes to logits within 2% (relative RMS) of the BF16 ones.

Run: .venv/bin/python tools/train/test_forward_matches_hf.py
"""

import json
import os
import sys
import tempfile
import unittest

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import export  # noqa: E402
from model import DeepseekV3Tiny, TinyConfig  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# float32 throughout; measured max |diff| of logits 1.3e-5 (different summation order in the
# expert combine and attention). 1e-4 leaves margin yet catches a wrong formula (rotate-half
# RoPE instead of adjacent pairs moves them by 10; weights are drawn with std 0.1 for that).
ATOL = 1e-4


def tiny_cfg_dict():
    with open(os.path.join(HERE, "tiny_arch.json")) as f:
        d = json.load(f)
    d.update(vocab_size=512, bos_token_id=0, eos_token_id=1)
    return d


def random_model(cfg_dict, seed=0):
    torch.manual_seed(seed)
    cfg = TinyConfig.from_dict(cfg_dict)
    model = DeepseekV3Tiny(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # norms other than 1 so that a missing norm shows
            else:
                p.normal_(0.0, 0.1)
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.uniform_(-0.3, 0.3)
    return model.eval()


class ForwardMatchesTransformers(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.set_num_threads(2)
        from transformers import DeepseekV3ForCausalLM

        cls.cfg_dict = tiny_cfg_dict()
        cls.model = random_model(cls.cfg_dict)
        cls.tmp = tempfile.TemporaryDirectory()
        sd = {k: v.clone() for k, v in cls.model.state_dict().items()}
        save_file(sd, os.path.join(cls.tmp.name, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(cls.tmp.name, "config.json"), "w") as f:
            json.dump(export.hf_config(cls.cfg_dict, quantized=False), f)
        cls.hf, cls.info = DeepseekV3ForCausalLM.from_pretrained(
            cls.tmp.name, dtype=torch.float32, output_loading_info=True,
            attn_implementation="eager")
        cls.hf.eval()
        g = torch.Generator().manual_seed(1)
        cls.ids = torch.randint(0, cls.cfg_dict["vocab_size"], (2, 96), generator=g)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_all_weights_loaded(self):
        self.assertEqual(list(self.info["missing_keys"]), [])
        # Only the MTP layer (which transformers does not model) may be left over.
        mtp = f"model.layers.{self.cfg_dict['num_hidden_layers']}."
        leftover = [k for k in self.info["unexpected_keys"] if not k.startswith(mtp)]
        self.assertEqual(leftover, [])

    def test_main_logits_match(self):
        with torch.no_grad():
            ours, _ = self.model(self.ids, with_mtp=False)
            theirs = self.hf(self.ids).logits
        diff = (ours - theirs).abs().max().item()
        self.assertLess(diff, ATOL, f"max |logit diff| {diff}")
        self.assertGreater(theirs.std().item(), 0.1)  # the comparison is not between zeros

    def test_routing_matches(self):
        # The chosen experts of the first MoE layer (integers): bitwise equal.
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_mod

        layer = self.cfg_dict["first_k_dense_replace"]
        g = torch.Generator().manual_seed(2)
        x = torch.randn(64, self.cfg_dict["hidden_size"], generator=g)
        with torch.no_grad():
            _, w_ours, i_ours = self.model.model.layers[layer].mlp.gate(x)
            _, w_hf, i_hf = self.hf.model.layers[layer].mlp.gate(x)
        o1, o2 = i_ours.sort(-1), i_hf.sort(-1)
        self.assertTrue(torch.equal(o1.values, o2.values))
        w_diff = (w_ours.gather(1, o1.indices) - w_hf.gather(1, o2.indices)).abs().max()
        self.assertLess(w_diff, 1e-6)
        self.assertIsInstance(self.hf.model.layers[layer].mlp.gate, hf_mod.DeepseekV3TopkRouter)

    def test_mtp_matches_reference_built_from_transformers(self):
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_mod

        hf_cfg = self.hf.config
        L = self.cfg_dict["num_hidden_layers"]
        ours = self.model.model.layers[L]
        sd = {k[len(f"model.layers.{L}."):]: v for k, v in self.model.state_dict().items()
              if k.startswith(f"model.layers.{L}.")}
        block = hf_mod.DeepseekV3DecoderLayer(hf_cfg, layer_idx=L).eval()
        E = self.cfg_dict["n_routed_experts"]
        block_sd = {k: v for k, v in sd.items() if k.split(".")[0] in
                    ("self_attn", "input_layernorm", "post_attention_layernorm")}
        block_sd.update({k: v for k, v in sd.items() if k.startswith("mlp.gate.") or
                         k.startswith("mlp.shared_experts.")})
        block_sd["mlp.experts.gate_up_proj"] = torch.stack([
            torch.cat([sd[f"mlp.experts.{e}.gate_proj.weight"],
                       sd[f"mlp.experts.{e}.up_proj.weight"]]) for e in range(E)])
        block_sd["mlp.experts.down_proj"] = torch.stack(
            [sd[f"mlp.experts.{e}.down_proj.weight"] for e in range(E)])
        block.load_state_dict(block_sd, strict=True)
        H, eps = self.cfg_dict["hidden_size"], self.cfg_dict["rms_norm_eps"]
        norms = {n: hf_mod.DeepseekV3RMSNorm(H, eps)
                 for n in ("enorm", "hnorm", "shared_head.norm")}
        for n, m in norms.items():
            m.weight.data.copy_(sd[n + ".weight"])

        with torch.no_grad():
            _, mtp_ours = self.model(self.ids)
            # h: transformers' last_hidden_state, the state after model.norm (the contract of
            # vLLM, SGLang and TensorRT-LLM); the last decoder layer's raw output is kept to show
            # that the test tells the two apart.
            seen = []
            hook = self.hf.model.layers[L - 1].register_forward_hook(
                lambda mod, args, out: seen.append(out[0] if isinstance(out, tuple) else out))
            normed = self.hf.model(self.ids).last_hidden_state
            hook.remove()
            pre_norm = seen[0]
            self.assertFalse(torch.allclose(pre_norm, normed))
            T = self.ids.shape[1] - 1
            e = self.hf.model.embed_tokens(self.ids[:, 1:])
            pos = torch.arange(T)[None]
            mask = torch.full((T, T), float("-inf")).triu(1)[None, None]

            def reference(h):
                x = torch.cat([norms["enorm"](e), norms["hnorm"](h[:, :-1])], -1)
                x = x @ sd["eh_proj.weight"].T
                x = block(x, attention_mask=mask, position_ids=pos,
                          position_embeddings=self.hf.model.rotary_emb(x, pos))
                return norms["shared_head.norm"](x) @ sd["shared_head.head.weight"].T

            theirs = reference(normed)
            wrong = reference(pre_norm)
        diff = (mtp_ours - theirs).abs().max().item()
        self.assertLess(diff, ATOL, f"max |MTP logit diff| {diff}")
        self.assertGreater((mtp_ours - wrong).abs().max().item(), 100 * ATOL,
                           "the MTP output does not depend on which hidden state it reads")
        # The MTP layer shares the main embedding and head (stored twice in the checkpoint).
        self.assertTrue(torch.equal(sd["embed_tokens.weight"], self.hf.model.embed_tokens.weight))
        self.assertTrue(torch.equal(sd["shared_head.head.weight"], self.hf.lm_head.weight))
        self.assertIs(ours.embed_tokens, self.model.model.embed_tokens)


class CommittedModel(unittest.TestCase):
    """models/expertmesh-tiny-bf16 loads in transformers as is and gives our logits; the FP8
    export dequantizes to nearly the same model."""

    def test_bf16_export_loads_in_transformers(self):
        from transformers import DeepseekV3ForCausalLM

        import eval_reference

        root = os.path.join(HERE, "..", "..", "models")
        ours, _ = eval_reference.load_model(os.path.join(root, "expertmesh-tiny-bf16"))
        hf, info = DeepseekV3ForCausalLM.from_pretrained(
            os.path.join(root, "expertmesh-tiny-bf16"), dtype=torch.float32,
            output_loading_info=True, attn_implementation="eager")
        self.assertEqual(list(info["missing_keys"]), [])
        g = torch.Generator().manual_seed(4)
        ids = torch.randint(0, hf.config.vocab_size, (1, 64), generator=g)
        with torch.no_grad():
            a, _ = ours(ids, with_mtp=False)
            b = hf(ids).logits
        diff = (a - b).abs().max().item()
        self.assertLess(diff, ATOL, f"max |logit diff| {diff}")
        # FP8 weights (dequantized): RMS logit difference / RMS logit measured 0.73% here
        # (e4m3 rounding, ~2% RMS per weight); bound 2%. Dropping the scales gives >> 100%.
        fp8, _ = eval_reference.load_model(os.path.join(root, "expertmesh-tiny"))
        with torch.no_grad():
            c, _ = fp8(ids, with_mtp=False)
        rel = ((a - c).pow(2).mean().sqrt() / a.pow(2).mean().sqrt()).item()
        self.assertLess(rel, 0.02, f"FP8 vs BF16 relative RMS logit difference {rel}")


class Fp8Export(unittest.TestCase):
    def test_block_quantization_round_trip(self):
        g = torch.Generator().manual_seed(3)
        w = torch.randn(300, 200, generator=g) * torch.logspace(-3, 0, 200)[None, :]
        w[:128, 128:] = 0.0  # an all-zero (ragged) block
        q, s = export.quantize_fp8_blocks(w)
        self.assertEqual(q.dtype, torch.float8_e4m3fn)
        self.assertEqual(tuple(s.shape), (3, 2))
        self.assertEqual(s.dtype, torch.float32)
        self.assertEqual(s[0, 1].item(), 1.0)
        deq = export.dequantize_fp8_blocks(q, s)
        # e4m3: 3 mantissa bits -> relative error <= 2^-4 for normals; subnormal spacing is
        # 2^-9 in units of the block scale, so absolute error <= 2^-10 * scale_inv.
        s_full = s.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
        bound = torch.maximum(w.abs() * 2**-4, s_full * 2**-10) * (1 + 1e-6)
        self.assertTrue(bool(((deq - w).abs() <= bound).all()))
        # The largest magnitude in each block maps to +-448 exactly.
        self.assertEqual(q.float().abs().max().item(), 448.0)

    def test_export_layout(self):
        cfg = tiny_cfg_dict()
        sd = random_model(cfg).state_dict()
        fp8 = export.export_tensors(sd, cfg, quantized=True)
        bf16 = export.export_tensors(sd, cfg, quantized=False)
        for name, t in fp8.items():
            if name.endswith("_scale_inv"):
                self.assertEqual(t.dtype, torch.float32)
                self.assertEqual(fp8[name[: -len("_scale_inv")]].dtype, torch.float8_e4m3fn)
            elif name.endswith("e_score_correction_bias"):
                self.assertEqual(t.dtype, torch.float32)
            elif t.dtype == torch.float8_e4m3fn:
                self.assertIn(name + "_scale_inv", fp8)
            else:
                self.assertEqual(t.dtype, torch.bfloat16, name)
        self.assertEqual(fp8["model.layers.1.mlp.experts.3.up_proj.weight"].dtype,
                         torch.float8_e4m3fn)
        self.assertEqual(fp8["model.layers.4.eh_proj.weight"].dtype, torch.bfloat16)
        self.assertEqual(fp8["model.layers.1.mlp.gate.weight"].dtype, torch.bfloat16)
        self.assertFalse(any(t.dtype == torch.float8_e4m3fn for t in bf16.values()))
        self.assertNotIn("model.layers.4.embed_tokens.weight", bf16)
        self.assertIn("model.layers.4.embed_tokens.weight", fp8)


if __name__ == "__main__":
    unittest.main(verbosity=2)
