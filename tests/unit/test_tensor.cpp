// Tensors: creation, strides, views, alignment, RNG determinism, bad input.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>

#include "test_util.hpp"

using namespace moa;

TEST_CASE("tensor: contiguous creation, strides and 64-byte alignment") {
  for (const Shape& s : {Shape{}, Shape{1}, Shape{7}, Shape{3, 5}, Shape{2, 3, 33}}) {
    Tensor t = Tensor::zeros(s);
    CHECK(t.shape() == s);
    CHECK(t.numel() == numel_of(s));
    CHECK(t.is_contiguous());
    CHECK(reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 64 == 0);
    for (float v : t.to_vector<float>()) CHECK(v == 0.0f);
  }
  Tensor t = Tensor::empty({2, 3, 4});
  CHECK(t.strides() == Strides{12, 4, 1});
  Tensor f = Tensor::full({2, 2}, 2.5, DType::f64);
  CHECK(f.to_vector<double>() == std::vector<double>{2.5, 2.5, 2.5, 2.5});
  Tensor v = Tensor::from_vector(std::vector<int32_t>{1, 2, 3}, {3});
  CHECK(v.dtype() == DType::i32);
  CHECK(v.to_vector<int32_t>() == std::vector<int32_t>{1, 2, 3});
}

TEST_CASE("tensor: views share storage and read the right elements") {
  std::vector<float> vals(24);
  std::iota(vals.begin(), vals.end(), 0.0f);
  Tensor x = Tensor::from_vector(vals, {2, 3, 4});
  // transpose: no copy, element (i, j, k) of x.transpose(0, 2) is x(k, j, i).
  Tensor xt = x.transpose(0, 2);
  CHECK(xt.shares_storage_with(x));
  CHECK_FALSE(xt.is_contiguous());
  CHECK(xt.shape() == Shape{4, 3, 2});
  const auto tv = xt.to_vector<float>();
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 3; ++j)
      for (int k = 0; k < 2; ++k) CHECK(tv[(i * 3 + j) * 2 + k] == vals[(k * 3 + j) * 4 + i]);
  // narrow: a view with an offset.
  Tensor n = x.narrow(2, 1, 2);
  CHECK(n.shares_storage_with(x));
  CHECK(n.to_vector<float>() == std::vector<float>{1, 2, 5, 6, 9, 10, 13, 14, 17, 18, 21, 22});
  // reshape of a contiguous tensor is a view; of a transposed one, a copy.
  Tensor r = x.reshape({6, -1});
  CHECK(r.shape() == Shape{6, 4});
  CHECK(r.shares_storage_with(x));
  Tensor rc = xt.reshape({-1});
  CHECK_FALSE(rc.shares_storage_with(x));
  CHECK(rc.to_vector<float>() == tv);
  // permute and its inverse give back x.
  Tensor p = x.permute({2, 0, 1}).permute({1, 2, 0});
  CHECK(p.to_vector<float>() == vals);
  CHECK(x.unsqueeze(1).shape() == Shape{2, 1, 3, 4});
  CHECK(x.unsqueeze(-1).shape() == Shape{2, 3, 4, 1});
  CHECK(x.unsqueeze(1).squeeze(1).to_vector<float>() == vals);
  // contiguous() of a view copies into row-major order.
  Tensor c = xt.contiguous();
  CHECK(c.is_contiguous());
  CHECK(c.to_vector<float>() == tv);
  // dtype casts.
  CHECK(x.to(DType::f64).to_vector<double>()[23] == 23.0);
  CHECK(x.to(DType::i32).to_vector<int32_t>()[5] == 5);
  // to i32: toward zero, saturating at the int32 range, NaN -> 0 (as a GPU converts; a plain C++
  // cast of these is undefined behaviour), from f32 and f64, by to() and by to_vector()
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> odd{std::nanf(""), 3e9f, -3e9f, inf, -inf, 2.7f, -2.7f, -2147483648.f, 2147483520.f};
  const std::vector<int32_t> odd_i{0, INT32_MAX, INT32_MIN, INT32_MAX, INT32_MIN, 2, -2, INT32_MIN, 2147483520};
  CHECK(Tensor::from_vector(odd).to(DType::i32).to_vector<int32_t>() == odd_i);
  CHECK(Tensor::from_vector(odd).to_vector<int32_t>() == odd_i);
  CHECK(Tensor::from_vector(odd).to(DType::f64).to(DType::i32).to_vector<int32_t>() == odd_i);
  CHECK(Tensor::from_vector(std::vector<double>{2147483647.9, -2147483648.9, 1e300}).to_vector<int32_t>() ==
        std::vector<int32_t>{INT32_MAX, INT32_MIN, INT32_MAX});
  Tensor fi = Tensor::zeros({3}, DType::i32);  // fill_ converts its value alike
  CHECK(fi.fill_(std::nan("")).to_vector<int32_t>() == std::vector<int32_t>(3, 0));
  CHECK(fi.fill_(3e9).to_vector<int32_t>() == std::vector<int32_t>(3, INT32_MAX));
  CHECK(fi.fill_(-7.9).to_vector<int32_t>() == std::vector<int32_t>(3, -7));
}

TEST_CASE("tensor: item and scalar") {
  Tensor s = Tensor::scalar(3.0);
  CHECK(s.dim() == 0);
  CHECK(s.numel() == 1);
  CHECK(s.item<float>() == 3.0f);
  test::check_throws_with<ShapeError>([] { (void)Tensor::zeros({2}).item<float>(); }, {"item", "[2]"});
}

TEST_CASE("rng: same seed repeats bitwise, whatever the thread count; moments are right") {
  Generator g1(42), g2(42), g3(43);
  Tensor a = Tensor::randn({1000, 33}, g1);
  const int saved = num_threads();
  set_num_threads(1);
  Tensor b = Tensor::randn({1000, 33}, g2);
  set_num_threads(saved);
  Tensor c = Tensor::randn({1000, 33}, g3);
  CHECK(a.to_vector<float>() == b.to_vector<float>());
  CHECK(a.to_vector<float>() != c.to_vector<float>());
  CHECK(g1.offset() == 33000);
  // The stream continues: the next draw differs from the first.
  Tensor a2 = Tensor::randn({1000, 33}, g1);
  CHECK(a2.to_vector<float>() != a.to_vector<float>());
  // Moments of N(0, 1) and U(0, 1) over 33,000 draws.
  const auto v = a.to_vector<double>();
  double m = 0, m2 = 0;
  for (double x : v) m += x;
  m /= static_cast<double>(v.size());
  for (double x : v) m2 += (x - m) * (x - m);
  m2 /= static_cast<double>(v.size());
  CHECK(std::abs(m) < 0.03);
  CHECK(std::abs(m2 - 1.0) < 0.05);
  Generator gu(7);
  const auto u = Tensor::rand({33000}, gu, DType::f64).to_vector<double>();
  double mu = 0, lo = 1, hi = 0;
  for (double x : u) {
    mu += x;
    lo = std::min(lo, x);
    hi = std::max(hi, x);
  }
  CHECK(std::abs(mu / 33000.0 - 0.5) < 0.01);
  CHECK(lo >= 0.0);
  CHECK(hi < 1.0);
  // State save/restore repeats the stream.
  Generator gs(5);
  (void)Tensor::randn({10}, gs);
  const auto seed = gs.seed(), off = gs.offset();
  Tensor x1 = Tensor::randn({17}, gs);
  gs.set_state(seed, off);
  Tensor x2 = Tensor::randn({17}, gs);
  CHECK(x1.to_vector<float>() == x2.to_vector<float>());
}

TEST_CASE("rng: Philox4x32-10 matches the Random123 known-answer vectors") {
  // Known-answer tests published with Random123 (kat_vectors): philox4x32_10.
  // counter {0,0,0,0}, key {0,0} -> 6627e8d5 e169c58d bc57ac4c 9b00dbd8
  auto r = detail::philox4x32_10(0, 0, 0);
  CHECK(r.v[0] == 0x6627e8d5u);
  CHECK(r.v[1] == 0xe169c58du);
  CHECK(r.v[2] == 0xbc57ac4cu);
  CHECK(r.v[3] == 0x9b00dbd8u);
  // counter all ones, key all ones -> 408f276d 41c83b0e a20bc7c6 6d5451fd
  auto r2 = detail::philox4x32_10(~0ull, ~0ull, ~0ull);
  CHECK(r2.v[0] == 0x408f276du);
  CHECK(r2.v[1] == 0x41c83b0eu);
  CHECK(r2.v[2] == 0xa20bc7c6u);
  CHECK(r2.v[3] == 0x6d5451fdu);
  // counter {243f6a88, 85a308d3, 13198a2e, 03707344}, key {a4093822, 299f31d0} (the digits of pi)
  auto r3 = detail::philox4x32_10(0x85a308d3243f6a88ull, 0x0370734413198a2eull, 0x299f31d0a4093822ull);
  CHECK(r3.v[0] == 0xd16cfe09u);
  CHECK(r3.v[1] == 0x94fdccebu);
  CHECK(r3.v[2] == 0x5001e420u);
  CHECK(r3.v[3] == 0x24126ea1u);
}

TEST_CASE("tensor: bad input gives moa errors that say what was expected and found") {
  test::check_throws_with<ShapeError>([] { (void)Tensor::empty({2, -1}); }, {"empty", "[2, -1]"});
  test::check_throws_with<ShapeError>([] { (void)Tensor::from_vector(std::vector<float>{1, 2, 3}, {2, 2}); },
                                      {"from_vector", "4", "3"});
  Tensor x = Tensor::zeros({2, 3});
  test::check_throws_with<ShapeError>([&] { (void)x.reshape({4, 2}); }, {"view", "[4, 2]", "6"});
  test::check_throws_with<ShapeError>([&] { (void)x.reshape({-1, -1}); }, {"at most one -1"});
  test::check_throws_with<IndexError>([&] { (void)x.transpose(0, 2); }, {"transpose", "axis 2", "rank 2"});
  test::check_throws_with<IndexError>([&] { (void)x.narrow(1, 2, 2); }, {"narrow", "start 2", "length 2"});
  test::check_throws_with<ShapeError>([&] { (void)x.squeeze(0); }, {"squeeze", "[2, 3]"});
  test::check_throws_with<ShapeError>([&] { (void)x.transpose(0, 1).view({6}); }, {"view", "contiguous"});
  test::check_throws_with<ValueError>([&] { (void)x.data<double>(); }, {"f64", "f32"});
  test::check_throws_with<ValueError>([] { (void)Tensor().shape(); }, {"undefined"});
  test::check_throws_with<ValueError>([] { Tensor::zeros({2}, DType::i32).set_requires_grad(); }, {"floating"});
  test::check_throws_with<DeviceError>([] { (void)Tensor::zeros({2}, DType::f32, Device::cuda()); }, {"cuda:0"});
  // Every error is a moa::Error carrying an id.
  try {
    (void)x.narrow(0, 5, 1);
    FAIL("expected a throw");
  } catch (const Error& e) {
    CHECK(e.id() == "index_error");
    CHECK(std::string(e.what()).rfind("[moa.index_error] ", 0) == 0);
  }
}

TEST_CASE("allocator: freed tensor memory is reused; a repeated training step allocates nothing new") {
  auto& alloc = detail::CachingHostAllocator::instance();
  if (!alloc.enabled()) return;  // AddressSanitizer builds bypass the cache on purpose
  auto& fresh = detail::storage_allocation_counter();
  const void* first = nullptr;
  {
    Tensor t = Tensor::empty({1000, 257});
    first = t.data_ptr();
  }
  const auto before = fresh.load();
  {
    Tensor t = Tensor::empty({1000, 257});
    CHECK(t.data_ptr() == first);
    CHECK(reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 64 == 0);
  }
  CHECK(fresh.load() == before);
  CHECK(detail::size_class(1) == 64);
  CHECK(detail::size_class(5000) == 5120);        // 4096 + 1/8 steps of 512
  CHECK(detail::size_class(1 << 20) == (1 << 20));

  Generator g(3);
  Tensor x = Tensor::randn({64, 32}, g);
  Tensor w1 = Tensor::randn({48, 32}, g).set_requires_grad();
  Tensor w2 = Tensor::randn({8, 48}, g).set_requires_grad();
  optim::AdamW opt({w1, w2});
  auto step = [&] {
    Tensor loss = mean(gelu(linear(gelu(linear(x, w1)), w2)));
    opt.zero_grad();
    loss.backward();
    opt.step();
  };
  step();
  step();
  const auto warm = fresh.load();
  for (int i = 0; i < 3; ++i) step();
  CHECK(fresh.load() == warm);
  empty_cache();
  CHECK(alloc.cached_bytes() == 0);
}
