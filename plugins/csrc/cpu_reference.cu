// The CPU reference: each op in plain loops in float, rounding where the CUDA kernels round. The
// library registers it for ONNX Runtime's CPU provider, so its glue and shapes are tested on
// machines without a GPU against the ops' reference bodies.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernel_common.cuh"
#include "ort_glue.h"

namespace llm2trt {

template <typename T>
void cpu_compute(const OpKind& kind, const Args& a) {
  const T* x = static_cast<const T*>(a.x.data);
  const T* skip = static_cast<const T*>(a.skip.data);
  const T* gamma = static_cast<const T*>(a.gamma.data);
  const T* w = static_cast<const T*>(a.w.data);
  // An NBits op's W in float: (code - zero point) * scale, not rounded to T (the one-row kernels
  // scale each block's dot product in float).
  std::vector<float> dequantized;
  if (kind.nbits) {
    const uint8_t* codes = static_cast<const uint8_t*>(a.w.data);
    const uint8_t* zeros = static_cast<const uint8_t*>(a.zeros.data);
    const T* scales = static_cast<const T*>(a.scales.data);
    const int64_t groups = a.k / a.block, row_bytes = a.k * a.bits / 8;
    dequantized.resize(size_t(a.n * a.k));
    for (int64_t j = 0; j < a.n; ++j)
      for (int64_t i = 0; i < a.k; ++i) {
        const int byte = codes[j * row_bytes + (a.bits == 4 ? i / 2 : i)];
        const int code = a.bits == 4 ? (byte >> (4 * (i % 2))) & 15 : byte;
        const int64_t at = j * groups + i / a.block;
        dequantized[j * a.k + i] = float(code - zeros[at]) * to_float(scales[at]);
      }
  }
  auto weight = [&](int64_t j, int64_t i) { return kind.nbits ? dequantized[j * a.k + i] : to_float(w[j * a.k + i]); };
  std::vector<float> row(a.k), z(a.n);
  for (int64_t r = 0; r < a.rows; ++r) {
    double squares = 0;
    for (int64_t i = 0; i < a.k; ++i) {
      float v = to_float(x[r * a.k + i]);
      if (kind.skip) {
        v = to_float(from_float<T>(v + to_float(skip[r * a.k + i])));
        if (a.sum.data) static_cast<T*>(a.sum.data)[r * a.k + i] = from_float<T>(v);
      }
      row[i] = v;
      squares += double(v) * v;
    }
    if (kind.norm) {
      float scale = 1.0f / std::sqrt(float(squares / a.k) + a.epsilon);
      for (int64_t i = 0; i < a.k; ++i) row[i] = to_float(from_float<T>(row[i] * scale * to_float(gamma[i])));
      if (a.normed.data)
        for (int64_t i = 0; i < a.k; ++i) static_cast<T*>(a.normed.data)[r * a.k + i] = from_float<T>(row[i]);
    }
    for (int64_t j = 0; j < a.n; ++j) {
      float acc = 0;
      for (int64_t i = 0; i < a.k; ++i) acc += row[i] * weight(j, i);
      z[j] = kind.float_y ? acc : to_float(from_float<T>(acc));
      if (a.gate_up.data) static_cast<T*>(a.gate_up.data)[r * a.n + j] = from_float<T>(acc);
    }
    if (kind.float_y) {
      std::copy(z.begin(), z.begin() + a.n_out, static_cast<float*>(a.y.data) + r * a.n_out);
      continue;
    }
    T* y = static_cast<T*>(a.y.data) + r * a.n_out;
    for (int64_t j = 0; j < a.n_out; ++j) {
      if (!kind.swiglu) {
        y[j] = from_float<T>(z[j]);
        continue;
      }
      float g = z[j], u = z[a.n_out + j];
      float act = to_float(from_float<T>(g / (1.0f + std::exp(-g))));
      y[j] = from_float<T>(act * u);
    }
  }
}

// Plain loops in float, in the reference's order: every new key and value into the cache, then
// each query over the keys up to its own position. C: the cache's element type, T or int8_t (the
// Int8KV ops: an entry is code * scale[KV head, channel]; the new keys and values are stored as
// round-half-even(value / scale) clipped to +-127, and attended, as the CUDA kernels and the body
// do, at their unquantized values).
template <typename T, typename C>
void cpu_attention_with(const AttentionArgs& a) {
  constexpr bool kInt8 = attention::kInt8Cache<C>;
  const attention::Shape& s = a.shape;
  const int D = s.head_dim, half = D / 2, group = s.group(), slots = s.heads + 2 * s.kv_heads;
  const T* qkv = static_cast<const T*>(a.qkv.data);
  const T* cos = static_cast<const T*>(a.cos.data);
  const T* sin = static_cast<const T*>(a.sin.data);
  const float* k_scale = static_cast<const float*>(a.k_scale.data);
  const float* v_scale = static_cast<const float*>(a.v_scale.data);
  const int* seqlens = static_cast<const int*>(a.seqlens.data);
  C* keys = static_cast<C*>(a.present_k.data);
  C* values = static_cast<C*>(a.present_v.data);
  T* out = static_cast<T*>(a.out.data);
  std::vector<float> rotated(D), scores(s.capacity);
  std::vector<T> normed(D);
  // QK-norm: the head's RMSNorm times its scale, rounded to T (as the reference body's norm output).
  auto norm_of = [&](const T* x, const void* gamma) -> const T* {
    if (!s.qk_norm) return x;
    float squares = 0.f;
    for (int d = 0; d < D; ++d) squares += to_float(x[d]) * to_float(x[d]);
    const float inverse = 1.f / std::sqrt(squares / float(D) + s.epsilon);
    for (int d = 0; d < D; ++d)
      normed[d] = from_float<T>(to_float(x[d]) * inverse * to_float(static_cast<const T*>(gamma)[d]));
    return normed.data();
  };
  auto rotate = [&](const T* x, int pos) {
    for (int d = 0; d < D; ++d) {
      const float c = to_float(cos[size_t(pos) * half + d % half]), sn = to_float(sin[size_t(pos) * half + d % half]);
      const float v = to_float(x[d]), partner = to_float(x[d < half ? d + half : d - half]);
      rotated[d] = to_float(from_float<T>(d < half ? v * c - partner * sn : v * c + partner * sn));
    }
  };
  auto position = [&](int b, int i) { return attention::past_length(s, seqlens, b) + i; };
  auto in_range = [&](int pos) { return pos >= 0 && pos < s.capacity && pos < s.positions; };
  auto head = [&](int b, int kvh) { return (size_t(b) * s.kv_heads + kvh) * s.capacity * D; };
  for (int b = 0; b < s.batch && keys != a.past_k.data; ++b) {  // a present cache apart from the past:
    const int past = attention::past_length(s, seqlens, b);      // the past rows, then zeros
    for (int kvh = 0; kvh < s.kv_heads; ++kvh)
      for (size_t at = head(b, kvh); at < head(b, kvh) + size_t(s.capacity) * D; ++at) {
        const bool kept = int((at - head(b, kvh)) / D) < past;
        keys[at] = kept ? static_cast<const C*>(a.past_k.data)[at] : attention::zero_entry<C>();
        values[at] = kept ? static_cast<const C*>(a.past_v.data)[at] : attention::zero_entry<C>();
      }
  }
  // The cache as the attention reads it, in float: the entries (int8: code * scale), then the new
  // tokens' keys and values as computed (T), whatever the cache stores for them.
  const size_t entries = size_t(s.batch) * s.kv_heads * s.capacity * D;
  std::vector<float> key_at(entries), value_at(entries);
  for (size_t at = 0; at < entries; ++at) {
    const size_t channel = at / (size_t(s.capacity) * D) % s.kv_heads * D + at % D;
    if constexpr (kInt8) {
      key_at[at] = float(keys[at]) * k_scale[channel];
      value_at[at] = float(values[at]) * v_scale[channel];
    } else {
      key_at[at] = to_float(keys[at]);
      value_at[at] = to_float(values[at]);
    }
  }
  auto store = [&](C* cache, std::vector<float>& read, size_t at, float v, const float* scale, int channel) {
    read[at] = v;
    float unused = 0.f;
    if constexpr (kInt8)
      cache[at] = attention::quantize(v, scale[channel], &unused);
    else
      cache[at] = from_float<T>(v);
  };
  for (int b = 0; b < s.batch; ++b)
    for (int i = 0; i < s.seq; ++i) {
      const int pos = position(b, i);
      if (!in_range(pos)) continue;
      const T* x = qkv + (size_t(b) * s.seq + i) * slots * D;
      for (int kvh = 0; kvh < s.kv_heads; ++kvh) {
        rotate(norm_of(x + size_t(s.heads + kvh) * D, a.k_norm.data), pos);
        for (int d = 0; d < D; ++d) {
          const size_t at = head(b, kvh) + size_t(pos) * D + d;
          store(keys, key_at, at, rotated[d], k_scale, kvh * D + d);
          store(values, value_at, at, to_float(x[size_t(s.heads + s.kv_heads + kvh) * D + d]), v_scale, kvh * D + d);
        }
      }
    }
  for (int b = 0; b < s.batch; ++b)
    for (int i = 0; i < s.seq; ++i) {
      const int pos = position(b, i), limit = std::min(pos + 1, s.total);
      const T* x = qkv + (size_t(b) * s.seq + i) * slots * D;
      for (int h = 0; h < s.heads; ++h) {
        T* y = out + ((size_t(b) * s.seq + i) * s.heads + h) * D;
        if (!in_range(pos)) {
          for (int d = 0; d < D; ++d) y[d] = from_float<T>(0.f);
          continue;
        }
        rotate(norm_of(x + size_t(h) * D, a.q_norm.data), pos);
        const size_t base = head(b, h / group);
        float top = -INFINITY;
        const int low = attention::first_key(s, pos);  // a local window's first key (0: none)
        for (int j = low; j < limit; ++j) {
          float dot = 0.f;
          for (int d = 0; d < D; ++d) dot += rotated[d] * s.scale * key_at[base + size_t(j) * D + d];
          scores[j] = dot;
          top = std::max(top, dot);
        }
        float sum = 0.f;
        for (int j = low; j < limit; ++j) sum += scores[j] = std::exp(scores[j] - top);
        for (int d = 0; d < D; ++d) {
          float acc = 0.f;
          for (int j = low; j < limit; ++j) acc += scores[j] * value_at[base + size_t(j) * D + d];
          y[d] = from_float<T>(acc / sum);
        }
      }
    }
}

template <typename T>
void cpu_attention(const AttentionArgs& a) {
  if (a.int8_cache)
    cpu_attention_with<T, int8_t>(a);
  else
    cpu_attention_with<T, T>(a);
}

// MoE in the reference body's order and roundings: each row's routing weights summed per expert
// (a repeated id adds up), then per routed expert gate and up rounded to T, SiLU as sigmoid and two
// products each rounded to T, Down's output rounded to T, and the experts mixed in float32 in
// expert order.
template <typename T>
void cpu_moe(const MoeArgs& a) {
  const T* x = static_cast<const T*>(a.x.data);
  const int64_t* ids = static_cast<const int64_t*>(a.ids.data);
  const float* weights = static_cast<const float*>(a.weights.data);
  const T* gate_up = static_cast<const T*>(a.gate_up.data);
  const T* down = static_cast<const T*>(a.down.data);
  T* y = static_cast<T*>(a.y.data);
  const int64_t H = a.hidden, I = a.inter, E = a.experts, K = a.k;
  auto round = [](float v) { return to_float(from_float<T>(v)); };
  auto dot = [](const T* w, const T* v, int64_t n) {
    float acc = 0.f;
    for (int64_t i = 0; i < n; ++i) acc += to_float(w[i]) * to_float(v[i]);
    return acc;
  };
  std::vector<float> dense(E), total(H);
  std::vector<char> routed(E);
  std::vector<T> h(I);
  for (int64_t n = 0; n < a.rows; ++n) {
    std::fill(dense.begin(), dense.end(), 0.f);
    std::fill(routed.begin(), routed.end(), 0);
    std::fill(total.begin(), total.end(), 0.f);
    for (int64_t j = 0; j < K; ++j) {
      const int64_t e = ids[n * K + j] - a.first;
      if (e < 0 || e >= E) continue;  // an expert of another block: adds nothing
      dense[e] += weights[n * K + j];
      routed[e] = 1;
    }
    const T* row = x + n * H;
    for (int64_t e = 0; e < E; ++e) {
      if (!routed[e]) continue;
      const T* gate = gate_up + e * 2 * I * H;
      for (int64_t i = 0; i < I; ++i) {
        const float g = round(dot(gate + i * H, row, H)), u = round(dot(gate + (I + i) * H, row, H));
        const float act = round(g * round(1.f / (1.f + std::exp(-g))));
        h[i] = from_float<T>(act * u);
      }
      for (int64_t o = 0; o < H; ++o) total[o] += round(dot(down + (e * H + o) * I, h.data(), I)) * dense[e];
    }
    for (int64_t o = 0; o < H; ++o) y[n * H + o] = from_float<T>(total[o]);
  }
}

template void cpu_compute<__half>(const OpKind&, const Args&);
template void cpu_compute<float>(const OpKind&, const Args&);
template void cpu_attention<__half>(const AttentionArgs&);
template void cpu_attention<float>(const AttentionArgs&);
template void cpu_moe<__half>(const MoeArgs&);
template void cpu_moe<__nv_bfloat16>(const MoeArgs&);
template void cpu_moe<float>(const MoeArgs&);

}  // namespace llm2trt
