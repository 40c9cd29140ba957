// C++-level tests of the level stack, the wrapper tensors and the dispatcher plumbing, run by
// ctest. A minimal harness (no gtest in a torch wheel): each CHECK failure is reported and makes
// the binary exit non-zero.
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/autograd.h>

#include <ATen/ThreadLocalState.h>

#include <functional>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "core/dispatch.h"
#include "core/levels.h"
#include "core/tensors.h"

namespace {
int failures = 0;
std::vector<std::pair<std::string, std::function<void()>>>& tests() {
  static std::vector<std::pair<std::string, std::function<void()>>> t;
  return t;
}
struct Register {
  Register(const char* name, std::function<void()> f) { tests().emplace_back(name, std::move(f)); }
};
#define TEST(name)                         \
  void name();                             \
  static Register reg_##name(#name, name); \
  void name()
#define CHECK(cond)                                                                      \
  do {                                                                                   \
    if (!(cond)) {                                                                       \
      ++failures;                                                                        \
      std::cerr << __FILE__ << ":" << __LINE__ << ": CHECK failed: " #cond << std::endl; \
    }                                                                                    \
  } while (0)

bool frontIncluded() {
  return c10::impl::tls_local_dispatch_key_set().included_.has(c10::DispatchKey::DeferredInit);
}
}  // namespace

using namespace ftl;

TEST(push_pop_restores_tls) {
  auto& s = levelStack();
  CHECK(s.depth() == 0);
  CHECK(!frontIncluded());
  int64_t a = s.push(LevelKind::Vmap, 3, Randomness::Error);
  CHECK(frontIncluded());
  int64_t b = s.push(LevelKind::Grad, 0, Randomness::Error);
  CHECK(b > a);  // inner levels have larger ids
  CHECK(s.top()->id == b);
  bool threw = false;
  try {
    s.pop(a);  // not the top
  } catch (const c10::Error&) {
    threw = true;
  }
  CHECK(threw);
  s.pop(b);
  s.pop(a);
  CHECK(s.depth() == 0);
  CHECK(!frontIncluded());
}

TEST(hand_down_guard_hides_and_restores) {
  auto& s = levelStack();
  int64_t a = s.push(LevelKind::Vmap, 2, Randomness::Error);
  {
    HandDownGuard g;
    CHECK(s.depth() == 0);
    CHECK(!frontIncluded());  // nothing below: ops go straight to torch's kernels
  }
  CHECK(s.depth() == 1);
  CHECK(frontIncluded());
  try {
    HandDownGuard g;
    throw std::runtime_error("boom");
  } catch (const std::runtime_error&) {
  }
  CHECK(s.depth() == 1);  // restored on exceptions too
  s.pop(a);
}

TEST(batched_tensor_reports_logical_metadata) {
  auto& s = levelStack();
  at::Tensor v = at::randn({3, 4, 5});  // random ops inside vmap follow its randomness mode
  int64_t a = s.push(LevelKind::Vmap, 4, Randomness::Error);
  at::Tensor b = makeBatched(v, 1, *s.top());
  CHECK(b.dim() == 2);
  CHECK(b.size(0) == 3 && b.size(1) == 5);
  CHECK(b.stride(0) == 20 && b.stride(1) == 1);
  CHECK(batchedAt(b, a) != nullptr);
  bool threw = false;
  try {
    (void)b.storage();
  } catch (const c10::Error&) {
    threw = true;
  }
  CHECK(threw);  // no path reads raw storage
  s.pop(a);
  CHECK(!asBatched(b)->isAlive());
}

TEST(vmap_sin_through_dispatcher) {
  initializeDispatch();
  auto& s = levelStack();
  at::Tensor v = at::randn({3, 2});
  int64_t a = s.push(LevelKind::Vmap, 3, Randomness::Error);
  at::Tensor out = at::sin(makeBatched(v, 0, *s.top()));
  auto* bo = batchedAt(out, a);
  CHECK(bo != nullptr);
  if (bo) CHECK(at::allclose(bo->value().movedim(bo->bdim(), 0), v.sin()));
  s.pop(a);
}

TEST(grad_level_records_its_own_graph) {
  initializeDispatch();
  auto& s = levelStack();
  at::Tensor x0 = at::tensor({0.5}), expected = at::tensor({1.0});
  int64_t g = s.push(LevelKind::Grad, 0, Randomness::Error);
  at::Tensor x = makeGradWrapper(x0, *s.top());
  x.requires_grad_(true);
  at::Tensor y = (x * x).sum();
  auto grads = torch::autograd::grad({y}, {x});
  auto* gw = asGradWrapper(grads[0]);
  CHECK(gw != nullptr);
  if (gw) CHECK(at::allclose(gw->value(), expected));
  s.pop(g);
}

TEST(device_threads_see_the_callers_stack) {
  // Autograd's device threads inherit ThreadLocalState; they must find the caller's levels.
  auto& s = levelStack();
  int64_t a = s.push(LevelKind::Vmap, 2, Randomness::Error);
  at::ThreadLocalState state;
  int64_t seen = -1;
  std::thread t([&] {
    at::ThreadLocalStateGuard g(state);
    const Level* top = levelStack().top();
    seen = top ? top->id : 0;
  });
  t.join();
  CHECK(seen == a);
  s.pop(a);
  std::thread t2([&] {
    const Level* top = levelStack().top();
    seen = top ? top->id : 0;
  });
  t2.join();
  CHECK(seen == 0);
}

TEST(random_op_under_randomness_error_raises) {
  auto& s = levelStack();
  int64_t a = s.push(LevelKind::Vmap, 3, Randomness::Error);
  bool threw = false;
  try {
    (void)at::randn({2});
  } catch (const c10::Error&) {
    threw = true;
  }
  CHECK(threw);
  s.pop(a);
}

int main() {
  initializeDispatch();
  int passed = 0, failed = 0;
  for (auto& [name, f] : tests()) {
    int before = failures;
    try {
      f();
    } catch (const std::exception& e) {
      ++failures;
      std::cerr << name << ": exception: " << e.what() << std::endl;
    }
    std::cout << (failures == before ? "PASS " : "FAIL ") << name << std::endl;
    (failures == before ? passed : failed)++;
  }
  std::cout << passed << " passed, " << failed << " failed" << std::endl;
  return failures ? 1 : 0;
}
