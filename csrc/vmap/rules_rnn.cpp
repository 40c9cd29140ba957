// Recurrent layers under vmap (rnn_tanh, rnn_relu, gru with a single hidden-state tensor; lstm
// with its (h0, c0) list).
//
// nn.RNN and nn.GRU create their default h0 with torch.zeros inside forward(): a tensor that is
// not batched, while the input is. torch's decomposition of these ops then computes
// linear(h, w_hh).add_(linear(x, w_ih)), an in-place write of batched values into an unbatched
// tensor, which vmap must refuse. Giving h0 the input's batching first, h0 + input.new_zeros(...)
// (new_* of a batched tensor is batched), changes no value and makes every intermediate batched
// like the input. The op then takes the usual path: the boxed front decomposes it at every level.
// nn.LSTM passes its own zeros (h0, c0) as a list, and its cell computes
// linear(h, w_hh).add_(linear(x, w_ih)) the same way: the list's tensors get the same treatment.
//
// NOTE [LSTM under vmap without oneDNN]
// torch's CPU LSTM takes oneDNN's fused layer (mkldnn_rnn_layer) for float32/bfloat16 inputs: one
// opaque op whose backward sums the weight gradient over its batch, so under vmap it could only
// run per example (the for-loop fallback). torch's other CPU path is the cell written with
// linear, sigmoid and tanh, which every level batches, per-example weight gradients included. So
// while a vmap level is on the stack, the LSTM runs that path: oneDNN is switched off for the
// call. torch keeps that switch process-wide (Context::userEnabledMkldnn), so it is counted: the
// first such LSTM turns it off, the last one to return restores the user's setting. Meanwhile
// another thread's CPU op takes its kernel without oneDNN (same values).
#include <ATen/Context.h>
#include <ATen/Operators.h>

#include <mutex>

#include "vmap/plumbing.h"

namespace ftl {
namespace {

bool anyVmapLevel() {
  const auto& s = levelStack();
  for (size_t i = 0; i < s.depth(); ++i)
    if (s.at(i).kind == LevelKind::Vmap) return true;
  return false;
}

template <class Op, class Sig = typename Op::schema>
struct RnnKernel;
template <class Op, class Ret, class... Rest>
struct RnnKernel<Op, Ret(const Tensor&, const Tensor&, Rest...)> {
  static Ret fn(c10::DispatchKeySet ks, const Tensor& input, const Tensor& hx, Rest... rest) {
    Tensor h = hx;
    if (asFt(input) && hx.defined() && anyVmapLevel()) {
      h = hx.add(input.new_zeros(hx.sizes()));
    }
    return detail::redirectToFront<Op, Ret, const Tensor&, const Tensor&, Rest...>(ks, input, h, rest...);
  }
};

class NoMkldnnGuard {
 public:
  NoMkldnnGuard() {
    std::lock_guard<std::mutex> lock(mutex());
    if (depth()++ == 0) {
      saved() = at::globalContext().userEnabledMkldnn();
      at::globalContext().setUserEnabledMkldnn(false);
    }
  }
  ~NoMkldnnGuard() {
    std::lock_guard<std::mutex> lock(mutex());
    if (--depth() == 0) at::globalContext().setUserEnabledMkldnn(saved());
  }
  NoMkldnnGuard(const NoMkldnnGuard&) = delete;
  NoMkldnnGuard& operator=(const NoMkldnnGuard&) = delete;

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static int& depth() {
    static int d = 0;
    return d;
  }
  static bool& saved() {
    static bool s = true;
    return s;
  }
};

// lstm.input(input, hx[], params[], ...): h0/c0 batched like the input, oneDNN off.
template <class Op, class Sig = typename Op::schema>
struct LstmKernel;
template <class Op, class Ret, class... Rest>
struct LstmKernel<Op, Ret(const Tensor&, at::TensorList, Rest...)> {
  static Ret fn(c10::DispatchKeySet ks, const Tensor& input, at::TensorList hx, Rest... rest) {
    if (!asFt(input) || !anyVmapLevel()) {
      return detail::redirectToFront<Op, Ret, const Tensor&, at::TensorList, Rest...>(ks, input, hx, rest...);
    }
    std::vector<Tensor> h;
    h.reserve(hx.size());
    for (const Tensor& t : hx) h.push_back(t.defined() ? t.add(input.new_zeros(t.sizes())) : t);
    NoMkldnnGuard no_mkldnn;
    return detail::redirectToFront<Op, Ret, const Tensor&, at::TensorList, Rest...>(ks, input, h, rest...);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(aten, DeferredInit, m) {
  m.impl("lstm.input", TORCH_FN(LstmKernel<at::_ops::lstm_input>::fn));
  m.impl("rnn_tanh.input", TORCH_FN(RnnKernel<at::_ops::rnn_tanh_input>::fn));
  m.impl("rnn_relu.input", TORCH_FN(RnnKernel<at::_ops::rnn_relu_input>::fn));
  m.impl("gru.input", TORCH_FN(RnnKernel<at::_ops::gru_input>::fn));
}

}  // namespace ftl
