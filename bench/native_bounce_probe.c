// Probe: can a GIL-free reader loop beat the Python ring loader's warm rate by copying
// small chunks to the GPU while they are still in the CPU's last-level cache?
//
// N threads take CHUNK-sized pieces of the given files in file order, pread each into one
// of K pinned slots of their own, and cudaMemcpyAsync it to a device buffer on a stream of
// their own; a slot is reused once its event fired. The CUDA runtime is dlopen()ed (path
// as argv[1]), so no CUDA headers are needed to build this.
//
//   gcc -O2 -pthread -o /tmp/probe bench/native_bounce_probe.c -ldl
//   /tmp/probe LIBCUDART "THREADS:CHUNK_KIB:SLOTS,..." FILE...
//
// Prints one line per config: GB/s from the first pread to the last copy's completion.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

typedef int (*memcpy_async_t)(void *, const void *, size_t, int, void *);
typedef int (*stream_create_t)(void **, unsigned);
typedef int (*event_create_t)(void **, unsigned);
typedef int (*event_record_t)(void *, void *);
typedef int (*event_sync_t)(void *);
typedef int (*malloc_t)(void **, size_t);
typedef int (*host_alloc_t)(void **, size_t, unsigned);
typedef int (*set_device_t)(int);
typedef int (*sync_t)(void);
typedef int (*free_t)(void *);
typedef int (*stream_sync_t)(void *);

static memcpy_async_t cu_memcpy;
static stream_create_t cu_stream_create;
static event_create_t cu_event_create;
static event_record_t cu_event_record;
static event_sync_t cu_event_sync;
static malloc_t cu_malloc;
static host_alloc_t cu_host_alloc;
static set_device_t cu_set_device;
static sync_t cu_sync;
static free_t cu_free_host;
static stream_sync_t cu_stream_sync;

struct job {
  int fd;
  off_t off;
  size_t len;
  size_t dst;  // offset into the device buffer
};

static struct job *jobs;
static size_t njobs;
static atomic_size_t next_job;
static char *dev_buf;
static size_t chunk;
static int slots;

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

#define CHECK(x)                                                        \
  do {                                                                  \
    int _e = (x);                                                       \
    if (_e) {                                                           \
      fprintf(stderr, "%s failed: %d at line %d\n", #x, _e, __LINE__); \
      exit(1);                                                          \
    }                                                                   \
  } while (0)

struct reader_state {
  void *stream;
  char *ring;
  void **events;
};

// Streams, rings and events are made before the clock starts (pinning is not the question).
static void reader_init(struct reader_state *r) {
  CHECK(cu_stream_create(&r->stream, 1));
  CHECK(cu_host_alloc((void **)&r->ring, chunk * slots, 0));
  r->events = calloc(slots, sizeof(void *));
  for (int i = 0; i < slots; i++) CHECK(cu_event_create(&r->events[i], 2));
}

static void *reader(void *arg) {
  struct reader_state *r = arg;
  CHECK(cu_set_device(0));
  void *stream = r->stream;
  char *ring = r->ring;
  void **events = r->events;
  int *armed = calloc(slots, sizeof(int));
  int turn = 0;
  for (;;) {
    size_t j = atomic_fetch_add(&next_job, 1);
    if (j >= njobs) break;
    char *slot = ring + (size_t)turn * chunk;
    if (armed[turn]) CHECK(cu_event_sync(events[turn]));
    size_t got = 0;
    while (got < jobs[j].len) {
      ssize_t n = pread(jobs[j].fd, slot + got, jobs[j].len - got, jobs[j].off + got);
      if (n <= 0) {
        perror("pread");
        exit(1);
      }
      got += n;
    }
    CHECK(cu_memcpy(dev_buf + jobs[j].dst, slot, jobs[j].len, 1, stream));
    CHECK(cu_event_record(events[turn], stream));
    armed[turn] = 1;
    turn = (turn + 1) % slots;
  }
  CHECK(cu_stream_sync(stream));
  free(armed);
  return NULL;
}

#define LOAD(var, name)                                    \
  do {                                                     \
    *(void **)&var = dlsym(lib, name);                     \
    if (!var) {                                            \
      fprintf(stderr, "no %s in the CUDA runtime\n", name); \
      return 1;                                            \
    }                                                      \
  } while (0)

int main(int argc, char **argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: %s LIBCUDART CONFIGS FILE...\n", argv[0]);
    return 2;
  }
  void *lib = dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL);
  if (!lib) {
    fprintf(stderr, "dlopen: %s\n", dlerror());
    return 1;
  }
  LOAD(cu_memcpy, "cudaMemcpyAsync");
  LOAD(cu_stream_create, "cudaStreamCreateWithFlags");
  LOAD(cu_event_create, "cudaEventCreateWithFlags");
  LOAD(cu_event_record, "cudaEventRecord");
  LOAD(cu_event_sync, "cudaEventSynchronize");
  LOAD(cu_malloc, "cudaMalloc");
  LOAD(cu_host_alloc, "cudaHostAlloc");
  LOAD(cu_set_device, "cudaSetDevice");
  LOAD(cu_sync, "cudaDeviceSynchronize");
  LOAD(cu_free_host, "cudaFreeHost");
  LOAD(cu_stream_sync, "cudaStreamSynchronize");

  int nfiles = argc - 3;
  int *fds = calloc(nfiles, sizeof(int));
  size_t *sizes = calloc(nfiles, sizeof(size_t));
  size_t total = 0;
  for (int i = 0; i < nfiles; i++) {
    fds[i] = open(argv[3 + i], O_RDONLY);
    if (fds[i] < 0) {
      perror(argv[3 + i]);
      return 1;
    }
    struct stat st;
    fstat(fds[i], &st);
    sizes[i] = st.st_size;
    total += st.st_size;
  }
  CHECK(cu_set_device(0));
  CHECK(cu_malloc((void **)&dev_buf, total));

  char *configs = strdup(argv[2]);
  for (char *cfg = strtok(configs, ","); cfg; cfg = strtok(NULL, ",")) {
    int threads, chunk_kib;
    if (sscanf(cfg, "%d:%d:%d", &threads, &chunk_kib, &slots) != 3) {
      fprintf(stderr, "bad config %s\n", cfg);
      return 2;
    }
    chunk = (size_t)chunk_kib << 10;
    njobs = 0;
    for (int i = 0; i < nfiles; i++) njobs += (sizes[i] + chunk - 1) / chunk;
    jobs = calloc(njobs, sizeof(struct job));
    size_t k = 0, dst = 0;
    for (int i = 0; i < nfiles; i++)
      for (size_t off = 0; off < sizes[i]; off += chunk, k++) {
        size_t len = sizes[i] - off < chunk ? sizes[i] - off : chunk;
        jobs[k] = (struct job){fds[i], (off_t)off, len, dst};
        dst += len;
      }
    struct reader_state *state = calloc(threads, sizeof(struct reader_state));
    for (int t = 0; t < threads; t++) reader_init(&state[t]);
    double best = 1e9;
    for (int rep = 0; rep < 3; rep++) {
      atomic_store(&next_job, 0);
      pthread_t *pool = calloc(threads, sizeof(pthread_t));
      double t0 = now();
      for (int t = 0; t < threads; t++) pthread_create(&pool[t], NULL, reader, &state[t]);
      for (int t = 0; t < threads; t++) pthread_join(pool[t], NULL);
      CHECK(cu_sync());
      double dt = now() - t0;
      if (dt < best) best = dt;
      free(pool);
    }
    for (int t = 0; t < threads; t++) CHECK(cu_free_host(state[t].ring));
    free(state);
    printf("native bounce %2d threads %5d KiB x %d slots: %.3f s  %.2f GB/s (best of 3)\n",
           threads, chunk_kib, slots, best, total / best / 1e9);
    fflush(stdout);
    free(jobs);
  }
  return 0;
}
