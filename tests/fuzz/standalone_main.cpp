// A small driver for LLVMFuzzerTestOneInput without libFuzzer, so every build
// (g++ included) exercises the fuzz targets under ASan/UBSan from ctest.
//
//   fuzz_x [file-or-dir ...]
//
// 1. Runs every file given (directories: every regular file inside, sorted).
// 2. Runs FPH_FUZZ_ITERATIONS (default 20000) deterministic mutations of those
//    inputs (bit flips, byte sets, interesting values, inserts, deletes,
//    truncation, splices) plus purely random inputs. FPH_FUZZ_SEED changes the
//    seed. Not coverage guided: a regression net, not a substitute for
//    libFuzzer (build with -DFPH_LIBFUZZER=ON and clang for that).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

struct Rng {
  uint64_t s;
  uint64_t next() {  // splitmix64
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  size_t below(size_t n) { return n == 0 ? 0 : static_cast<size_t>(next() % n); }
};

std::vector<uint8_t> read_file(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

void run(const std::vector<uint8_t>& in) {
  // A private copy of exactly in.size() bytes, so ASan sees reads past the end.
  std::unique_ptr<uint8_t[]> buf(new uint8_t[in.size() ? in.size() : 1]);
  std::copy(in.begin(), in.end(), buf.get());
  LLVMFuzzerTestOneInput(buf.get(), in.size());
}

constexpr size_t kMaxLen = 16384;

void mutate(std::vector<uint8_t>& v, Rng& rng, const std::vector<std::vector<uint8_t>>& corpus) {
  static const uint64_t kInteresting[] = {0,          1,          2,          7,
                                          8,          12,         16,         0x7f,
                                          0x80,       0xff,       0x100,      0x1ff,
                                          0xffff,     0x8000,     0x7fffffff, 0xffffffff,
                                          0x100000000ull, ~0ull,  ~0ull - 4095, 0x8000000000000000ull};
  const size_t rounds = 1 + rng.below(8);
  for (size_t r = 0; r < rounds; ++r) {
    switch (rng.below(8)) {
      case 0:  // flip a bit
        if (!v.empty()) v[rng.below(v.size())] ^= static_cast<uint8_t>(1u << rng.below(8));
        break;
      case 1:  // random byte
        if (!v.empty()) v[rng.below(v.size())] = static_cast<uint8_t>(rng.next());
        break;
      case 2: {  // interesting little-endian value of width 1/2/4/8
        const size_t w = size_t{1} << rng.below(4);
        if (v.size() >= w) {
          const uint64_t val = kInteresting[rng.below(std::size(kInteresting))];
          const size_t at = rng.below(v.size() - w + 1);
          for (size_t i = 0; i < w; ++i) v[at + i] = static_cast<uint8_t>(val >> (8 * i));
        }
        break;
      }
      case 3: {  // insert random bytes
        const size_t n = 1 + rng.below(16);
        const size_t at = rng.below(v.size() + 1);
        std::vector<uint8_t> ins(n);
        for (auto& b : ins) b = static_cast<uint8_t>(rng.next());
        v.insert(v.begin() + static_cast<ptrdiff_t>(at), ins.begin(), ins.end());
        break;
      }
      case 4: {  // delete a range
        if (v.empty()) break;
        const size_t at = rng.below(v.size());
        const size_t n = 1 + rng.below(std::min<size_t>(16, v.size() - at));
        v.erase(v.begin() + static_cast<ptrdiff_t>(at), v.begin() + static_cast<ptrdiff_t>(at + n));
        break;
      }
      case 5:  // truncate
        v.resize(rng.below(v.size() + 1));
        break;
      case 6: {  // splice a piece of another input
        if (corpus.empty()) break;
        const auto& o = corpus[rng.below(corpus.size())];
        if (o.empty()) break;
        const size_t from = rng.below(o.size());
        const size_t n = 1 + rng.below(o.size() - from);
        const size_t at = rng.below(v.size() + 1);
        v.insert(v.begin() + static_cast<ptrdiff_t>(at), o.begin() + static_cast<ptrdiff_t>(from),
                 o.begin() + static_cast<ptrdiff_t>(from + n));
        break;
      }
      case 7: {  // copy a chunk within the input (repeated structures)
        if (v.size() < 2) break;
        const size_t n = 1 + rng.below(std::min<size_t>(32, v.size() / 2));
        const size_t from = rng.below(v.size() - n + 1);
        const size_t to = rng.below(v.size() - n + 1);
        std::copy_n(v.begin() + static_cast<ptrdiff_t>(from), n, v.begin() + static_cast<ptrdiff_t>(to));
        break;
      }
    }
  }
  if (v.size() > kMaxLen) v.resize(kMaxLen);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::vector<uint8_t>> corpus;
  for (int i = 1; i < argc; ++i) {
    std::filesystem::path p(argv[i]);
    std::error_code ec;
    if (std::filesystem::is_directory(p, ec)) {
      std::vector<std::filesystem::path> files;
      for (const auto& e : std::filesystem::directory_iterator(p)) {
        if (e.is_regular_file()) files.push_back(e.path());
      }
      std::sort(files.begin(), files.end());
      for (const auto& f : files) corpus.push_back(read_file(f));
    } else if (std::filesystem::is_regular_file(p, ec)) {
      corpus.push_back(read_file(p));
    } else {
      std::fprintf(stderr, "fuzz: no such file or directory: %s\n", argv[i]);
      return 2;
    }
  }
  for (const auto& in : corpus) run(in);

  uint64_t iterations = 20000;
  if (const char* e = std::getenv("FPH_FUZZ_ITERATIONS")) iterations = std::strtoull(e, nullptr, 10);
  uint64_t seed = 0x66706866757a7a31ull;  // "fphfuzz1"
  if (const char* e = std::getenv("FPH_FUZZ_SEED")) seed = std::strtoull(e, nullptr, 0);
  Rng rng{seed};

  for (uint64_t it = 0; it < iterations; ++it) {
    std::vector<uint8_t> v;
    if (corpus.empty() || rng.below(8) == 0) {
      v.resize(rng.below(rng.below(4) == 0 ? 4096 : 128));
      for (auto& b : v) b = static_cast<uint8_t>(rng.next());
    } else {
      v = corpus[rng.below(corpus.size())];
      mutate(v, rng, corpus);
    }
    run(v);
  }
  std::printf("fuzz: %zu corpus inputs, %llu mutated/random inputs, no crash\n", corpus.size(),
              static_cast<unsigned long long>(iterations));
  return 0;
}
