/* fph-linux-workload: the program a real Linux guest (user-mode Linux, see
 * scripts/linux-guest.sh and docs/linux-guests.md) runs to give fphd
 * something to reclaim and to check that reclaim never touched memory the
 * guest still owns.
 *
 * Phases:
 *   1. allocate --total MiB (anonymous, private) and write a per-page pattern
 *      (every 8-byte word derives from seed, page id and word index);
 *   2. hold (wait point "allocated");
 *   3. munmap all but the first --keep MiB: the guest kernel really frees
 *      those pages, page reporting hands them to the host;
 *      (with --pin-every N: all but one page in every N MiB of it, so the
 *      freed memory is cut into blocks smaller than N MiB, and all but its
 *      last 8 MiB, the "flush tail");
 *   4. hold (wait point "freed"), then verify the kept (and pinned) pages;
 *      with --pin-every, unmap the pinned pages and then the flush tail
 *      (event "unpinned"), hold (wait point "unpinned"). Single pages a
 *      process frees wait in the kernel's per-cpu page lists (a few hundred
 *      pages, oldest out first) before they reach the buddy allocator and
 *      can merge and be reported; the flush tail pushes the pins through;
 *   5. allocate --realloc MiB and write it (new page ids);
 *   6. hold (wait point "reallocated"), then verify every page still owned.
 *
 * A wait point sleeps --hold-* seconds, or with --wait-stdin blocks until a
 * line arrives on stdin (the host writes to UML's console), so a test drives
 * the phases. Output: one event per line on stdout, "FPH <event> key=value
 * ...", flushed at once. Exit 0 if every verification was clean, 1 if a page
 * was corrupted, 2 on a usage or system error.
 *
 * Static, C only, no dependencies: it runs from a busybox root on hostfs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define WORDS (PAGE / sizeof(uint64_t))
#define MIB (1024u * 1024u)

struct options {
  uint64_t total_mib, keep_mib, realloc_mib, seed, pin_every_mib;
  double hold_allocated, hold_freed, hold_reallocated;
  int wait_stdin, populate;
};

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static long meminfo_kib(const char *key) {
  FILE *f = fopen("/proc/meminfo", "r");
  if (!f) return -1;
  char line[256];
  long v = -1;
  size_t n = strlen(key);
  while (fgets(line, sizeof line, f)) {
    if (strncmp(line, key, n) == 0 && line[n] == ':') {
      v = strtol(line + n + 1, NULL, 10);
      break;
    }
  }
  fclose(f);
  return v;
}

/* One marker line, written with a single write() so it is not interleaved
 * with the kernel's console output. */
static void marker(const char *event, const char *fmt, ...) {
  char buf[512];
  int n = snprintf(buf, sizeof buf, "FPH %s", event);
  if (fmt && fmt[0]) {
    buf[n++] = ' ';
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(buf + n, sizeof buf - (size_t)n - 2, fmt, ap);
    va_end(ap);
  }
  if (n > (int)sizeof buf - 2) n = (int)sizeof buf - 2;
  n += snprintf(buf + n, sizeof buf - (size_t)n, " mem_free_kib=%ld\n", meminfo_kib("MemFree"));
  if (n > (int)sizeof buf - 1) n = (int)sizeof buf - 1;
  const char *p = buf;
  while (n > 0) {
    ssize_t w = write(1, p, (size_t)n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) break;
    p += w;
    n -= (int)w;
  }
}

static void die(const char *what) {
  marker("error", "what=%s errno=%d text=%s", what, errno, strerror(errno));
  exit(2);
}

static uint64_t mix(uint64_t x) { /* splitmix64 finaliser */
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

static void write_page(uint64_t *p, uint64_t seed, uint64_t id) {
  const uint64_t base = mix(seed ^ mix(id));
  for (unsigned i = 0; i < WORDS; i++) p[i] = base + i * 0x9e3779b97f4a7c15ull;
  p[0] = id; /* the first word names the page: a page from elsewhere is told apart from a zeroed one */
}

/* 0 if the page holds what write_page wrote, else 1 (and reports the first few). */
static int check_page(const uint64_t *p, uint64_t seed, uint64_t id, uint64_t *reported) {
  const uint64_t base = mix(seed ^ mix(id));
  int bad = p[0] != id;
  for (unsigned i = 1; i < WORDS && !bad; i++) bad = p[i] != base + i * 0x9e3779b97f4a7c15ull;
  if (bad && (*reported)++ < 8) {
    int zero = 1;
    for (unsigned i = 0; i < WORDS && zero; i++) zero = p[i] == 0;
    marker("corrupt", "page_id=%llu first_word=0x%llx zeroed=%d", (unsigned long long)id,
           (unsigned long long)p[0], zero);
  }
  return bad;
}

struct region {
  uint8_t *addr;
  uint64_t pages;
  uint64_t first_id;
};

static struct region alloc_write(uint64_t mib, uint64_t first_id, uint64_t seed, int populate) {
  struct region r = {NULL, mib * MIB / PAGE, first_id};
  if (mib == 0) return r;
  int flags = MAP_PRIVATE | MAP_ANONYMOUS | (populate ? MAP_POPULATE : 0);
  void *a = mmap(NULL, mib * MIB, PROT_READ | PROT_WRITE, flags, -1, 0);
  if (a == MAP_FAILED) die("mmap");
  r.addr = a;
  for (uint64_t i = 0; i < r.pages; i++) write_page((uint64_t *)(r.addr + i * PAGE), seed, first_id + i);
  return r;
}

static uint64_t verify(const struct region *rs, int n, uint64_t seed, uint64_t *checked) {
  uint64_t corrupted = 0, reported = 0;
  *checked = 0;
  for (int k = 0; k < n; k++)
    for (uint64_t i = 0; i < rs[k].pages; i++) {
      corrupted += (uint64_t)check_page((const uint64_t *)(rs[k].addr + i * PAGE), seed,
                                        rs[k].first_id + i, &reported);
      ++*checked;
    }
  return corrupted;
}

static void wait_point(const char *phase, double hold, int wait_stdin) {
  if (wait_stdin) {
    marker("waiting", "phase=%s", phase);
    char line[128];
    for (;;) { /* one line (or EOF) releases the wait */
      ssize_t r = read(0, line, sizeof line);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0 || memchr(line, '\n', (size_t)r) || memchr(line, '\r', (size_t)r)) break;
    }
  } else if (hold > 0) {
    marker("holding", "phase=%s seconds=%.1f", phase, hold);
    struct timespec ts = {(time_t)hold, (long)((hold - (double)(time_t)hold) * 1e9)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
  } else {
    return;
  }
  marker("resumed", "phase=%s", phase);
}

static void usage(FILE *to) {
  fprintf(to,
          "usage: fph-linux-workload [options]\n"
          "  --total MiB            memory to allocate and write first (default 96)\n"
          "  --keep MiB             of it, memory kept to the end (default 16)\n"
          "  --realloc MiB          memory allocated and written after the free (default 16)\n"
          "  --seed N               pattern seed (default 1)\n"
          "  --hold-allocated S     seconds to hold before freeing (default 0)\n"
          "  --hold-freed S         seconds to wait after freeing (default 0)\n"
          "  --hold-reallocated S   seconds to wait before the final verify (default 0)\n"
          "  --wait-stdin           at each wait point print 'FPH waiting phase=P' and\n"
          "                         wait for a line on stdin instead of sleeping\n"
          "  --populate             MAP_POPULATE the allocations\n"
          "  --pin-every MiB        free all but the first page of every MiB-sized chunk\n"
          "                         first (smaller free blocks), the pinned pages later\n");
}

static uint64_t parse_u64(const char *s, const char *name) {
  char *end;
  errno = 0;
  unsigned long long v = strtoull(s, &end, 10);
  if (errno || *end || end == s) {
    fprintf(stderr, "fph-linux-workload: bad %s '%s'\n", name, s);
    exit(2);
  }
  return v;
}

static double parse_s(const char *s, const char *name) {
  char *end;
  double v = strtod(s, &end);
  if (*end || end == s || v < 0) {
    fprintf(stderr, "fph-linux-workload: bad %s '%s'\n", name, s);
    exit(2);
  }
  return v;
}

int main(int argc, char **argv) {
  struct options o = {96, 16, 16, 1, 0, 0, 0, 0, 0, 0};
  static const struct option longs[] = {
      {"total", required_argument, 0, 't'},           {"keep", required_argument, 0, 'k'},
      {"realloc", required_argument, 0, 'r'},         {"seed", required_argument, 0, 's'},
      {"hold-allocated", required_argument, 0, 'A'},  {"hold-freed", required_argument, 0, 'F'},
      {"hold-reallocated", required_argument, 0, 'R'}, {"wait-stdin", no_argument, 0, 'w'},
      {"populate", no_argument, 0, 'p'},              {"help", no_argument, 0, 'h'},
      {"pin-every", required_argument, 0, 'P'},
      {0, 0, 0, 0}};
  int c;
  while ((c = getopt_long(argc, argv, "h", longs, NULL)) != -1) {
    switch (c) {
      case 't': o.total_mib = parse_u64(optarg, "--total"); break;
      case 'k': o.keep_mib = parse_u64(optarg, "--keep"); break;
      case 'r': o.realloc_mib = parse_u64(optarg, "--realloc"); break;
      case 's': o.seed = parse_u64(optarg, "--seed"); break;
      case 'A': o.hold_allocated = parse_s(optarg, "--hold-allocated"); break;
      case 'F': o.hold_freed = parse_s(optarg, "--hold-freed"); break;
      case 'R': o.hold_reallocated = parse_s(optarg, "--hold-reallocated"); break;
      case 'w': o.wait_stdin = 1; break;
      case 'p': o.populate = 1; break;
      case 'P': o.pin_every_mib = parse_u64(optarg, "--pin-every"); break;
      case 'h': usage(stdout); return 0;
      default: usage(stderr); return 2;
    }
  }
  if (optind != argc || o.keep_mib > o.total_mib || o.total_mib == 0) {
    usage(stderr);
    return 2;
  }
  setvbuf(stdout, NULL, _IONBF, 0);

  marker("start", "total_bytes=%llu keep_bytes=%llu realloc_bytes=%llu seed=%llu",
         (unsigned long long)(o.total_mib * MIB), (unsigned long long)(o.keep_mib * MIB),
         (unsigned long long)(o.realloc_mib * MIB), (unsigned long long)o.seed);

  double t0 = now_s();
  struct region all = alloc_write(o.total_mib, 0, o.seed, o.populate);
  marker("allocated", "bytes=%llu seconds=%.2f", (unsigned long long)(o.total_mib * MIB), now_s() - t0);
  wait_point("allocated", o.hold_allocated, o.wait_stdin);

  const uint64_t rest = (o.total_mib - o.keep_mib) * MIB;
  uint8_t *const rest_addr = all.addr + o.keep_mib * MIB;
  struct region kept = {all.addr, o.keep_mib * MIB / PAGE, 0};
  uint64_t checked, corrupted_total = 0, bad;
  if (o.pin_every_mib == 0) {
    if (rest && munmap(rest_addr, rest) != 0) die("munmap");
    marker("freed", "bytes=%llu", (unsigned long long)rest);
    wait_point("freed", o.hold_freed, o.wait_stdin);
  } else {
    const uint64_t tail = rest / 2 < 8 * MIB ? rest / 2 / PAGE * PAGE : 8 * MIB;
    const uint64_t pinned_part = rest - tail;
    const uint64_t chunk = o.pin_every_mib * MIB, chunks = (pinned_part + chunk - 1) / chunk;
    uint64_t freed = 0;
    for (uint64_t c = 0; c < chunks; c++) {
      const uint64_t len = (c + 1) * chunk <= pinned_part ? chunk : pinned_part - c * chunk;
      if (len > PAGE && munmap(rest_addr + c * chunk + PAGE, len - PAGE) != 0) die("munmap");
      freed += len > PAGE ? len - PAGE : 0;
    }
    marker("freed", "bytes=%llu pinned_pages=%llu", (unsigned long long)freed, (unsigned long long)chunks);
    wait_point("freed", o.hold_freed, o.wait_stdin);
    bad = 0;
    uint64_t reported = 0;
    for (uint64_t c = 0; c < chunks; c++)
      bad += (uint64_t)check_page((const uint64_t *)(rest_addr + c * chunk), o.seed,
                                  kept.pages + c * chunk / PAGE, &reported);
    corrupted_total += bad;
    marker("verify", "phase=pinned corrupted_pages=%llu checked_pages=%llu", (unsigned long long)bad,
           (unsigned long long)chunks);
    for (uint64_t c = 0; c < chunks; c++)
      if (munmap(rest_addr + c * chunk, PAGE) != 0) die("munmap");
    if (tail && munmap(rest_addr + pinned_part, tail) != 0) die("munmap");
    marker("unpinned", "bytes=%llu", (unsigned long long)(chunks * PAGE + tail));
    wait_point("unpinned", o.hold_freed, o.wait_stdin);
  }

  bad = verify(&kept, 1, o.seed, &checked);
  corrupted_total += bad;
  marker("verify", "phase=freed corrupted_pages=%llu checked_pages=%llu", (unsigned long long)bad,
         (unsigned long long)checked);

  t0 = now_s();
  struct region re = alloc_write(o.realloc_mib, all.pages, o.seed, o.populate);
  marker("reallocated", "bytes=%llu seconds=%.2f", (unsigned long long)(o.realloc_mib * MIB),
         now_s() - t0);
  wait_point("reallocated", o.hold_reallocated, o.wait_stdin);

  struct region owned[2] = {kept, re};
  bad = verify(owned, 2, o.seed, &checked);
  corrupted_total += bad;
  marker("verify", "phase=final corrupted_pages=%llu checked_pages=%llu", (unsigned long long)bad,
         (unsigned long long)checked);
  marker("done", "status=%s", corrupted_total ? "corrupted" : "ok");
  return corrupted_total ? 1 : 0;
}
