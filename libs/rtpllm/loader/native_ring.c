// The loader's reader loop in C, for same-dtype pieces going to one CUDA device (or, for
// tests and CPU targets, to host memory). native_ring.py builds this file with the
// system C compiler on first use and calls rtp_ring_load through ctypes; see there for
// why, and for the Python loop that does the same where no compiler is found.
//
// Each reader thread owns `slots` buffers of `chunk` bytes, page-locked, and a CUDA
// stream. It claims the next extent (file order), reads it a chunk at a time with pread
// into its next buffer (first waiting for that buffer's last copies), and launches the
// cudaMemcpyAsync of every piece part the chunk holds. Chunks small enough to stay in
// the CPU's last-level cache until the GPU reads them are the point: the copy engine
// then reads cache, not DRAM. An extent not in the page cache gets a WILLNEED hint
// first, so the disk sees the whole extent requested at once.
//
// The CUDA runtime is the one torch loaded (dlopen of its path returns that same
// library, with its primary context), so no CUDA headers are needed to build this.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define HUGE_PAGE (2L << 20)
#define ERR_TRUNCATED 1
#define ERR_READ 2
#define ERR_CUDA 3
#define ERR_MEMORY 4

typedef int (*memcpy_async_fn)(void *, const void *, size_t, int, void *);
typedef int (*stream_create_fn)(void **, unsigned);
typedef int (*stream_fn)(void *);
typedef int (*event_create_fn)(void **, unsigned);
typedef int (*event_record_fn)(void *, void *);
typedef int (*event_fn)(void *);
typedef int (*set_device_fn)(int);
typedef int (*host_register_fn)(void *, size_t, unsigned);
typedef int (*host_unregister_fn)(void *);
typedef const char *(*error_string_fn)(int);

struct cuda {
  memcpy_async_fn memcpy_async;
  stream_create_fn stream_create;
  stream_fn stream_sync, stream_destroy;
  event_create_fn event_create;
  event_record_fn event_record;
  event_fn event_sync, event_destroy;
  set_device_fn set_device;
  host_register_fn host_register;
  host_unregister_fn host_unregister;
  error_string_fn error_string;
};

struct job {
  // The plan, as flat arrays (see native_ring.py).
  const int32_t *file_fd;
  const int64_t *file_size;
  const int32_t *ext_file;
  const int64_t *ext_offset, *ext_nbytes, *ext_first_piece;
  const int64_t *piece_offset, *piece_nbytes;
  const uint64_t *piece_dst;
  int64_t nextents;
  int64_t chunk;
  int slots, device, readahead;
  struct cuda *cuda;  // NULL: host destinations, plain memcpy
  unsigned char **maps;  // per file: a PROT_READ mapping only passed to mincore()
  // Shared state.
  atomic_llong next;
  atomic_int failed;
  int64_t *done_bytes;  // read by the Python side for progress
  int64_t *err_info;    // [kind, file index, offset, code]
  char *err;
  int errlen;
  pthread_mutex_t err_lock;
};

struct reader {
  struct job *job;
  double alloc_s, read_s, wait_s, issue_s, hint_s;
  int64_t hints;
};

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// Record the first failure (later ones are consequences); every reader then stops.
static void fail(struct job *job, int kind, int64_t file, int64_t offset, int64_t code, const char *fmt, ...) {
  pthread_mutex_lock(&job->err_lock);
  if (!atomic_load(&job->failed)) {
    job->err_info[0] = kind;
    job->err_info[1] = file;
    job->err_info[2] = offset;
    job->err_info[3] = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(job->err, job->errlen, fmt, ap);
    va_end(ap);
    atomic_store(&job->failed, 1);
  }
  pthread_mutex_unlock(&job->err_lock);
}

static int cuda_ok(struct job *job, int rc, const char *what) {
  if (rc == 0) return 1;
  fail(job, ERR_CUDA, -1, 0, rc, "%s failed: %s", what, job->cuda->error_string(rc));
  return 0;
}

// Whether bytes [offset, offset + n) of file f look cached: first, middle and last page.
static int resident(struct job *job, int f, int64_t offset, int64_t n) {
  unsigned char *map = job->maps[f];
  if (map == NULL) return 1;  // cannot tell: no hint
  long page = sysconf(_SC_PAGESIZE);
  int64_t probes[3] = {offset, offset + n / 2, offset + n - 1};
  for (int i = 0; i < 3; i++) {
    unsigned char vec = 0;
    int64_t at = probes[i] - probes[i] % page;
    if (mincore(map + at, 1, &vec) != 0 || !(vec & 1)) return 0;
  }
  return 1;
}

// Fill buf with file bytes [offset, offset + n); 0 on success.
static int read_full(struct job *job, int f, char *buf, int64_t n, int64_t offset) {
  int64_t got = 0;
  while (got < n) {
    ssize_t r = pread(job->file_fd[f], buf + got, n - got, offset + got);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      fail(job, ERR_READ, f, offset + got, errno, "%s", strerror(errno));
      return -1;
    }
    if (r == 0) {
      fail(job, ERR_TRUNCATED, f, offset + got, offset + n, "truncated");
      return -1;
    }
    got += r;
  }
  return 0;
}

// A 2 MiB-aligned, huge-page-advised buffer; page-locked when copying to a GPU.
static char *ring_alloc(struct job *job, size_t bytes, void **base, size_t *length) {
  *length = (bytes + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE + HUGE_PAGE;
  void *m = mmap(NULL, *length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) {
    fail(job, ERR_MEMORY, -1, 0, errno, "mmap of %zu bytes: %s", *length, strerror(errno));
    return NULL;
  }
  madvise(m, *length, MADV_HUGEPAGE);
  *base = m;
  char *ring = (char *)m + ((HUGE_PAGE - (uintptr_t)m % HUGE_PAGE) % HUGE_PAGE);
  for (size_t at = 0; at < bytes; at += 4096) ring[at] = 0;  // fault in here, not in the driver
  if (job->cuda && !cuda_ok(job, job->cuda->host_register(ring, bytes, 0), "cudaHostRegister")) {
    munmap(m, *length);
    return NULL;
  }
  return ring;
}

static void *reader_main(void *arg) {
  struct reader *r = arg;
  struct job *job = r->job;
  struct cuda *cu = job->cuda;
  void *stream = NULL, *base = NULL;
  void **events = calloc(job->slots, sizeof(void *));
  int *armed = calloc(job->slots, sizeof(int));
  size_t ring_bytes = (size_t)job->chunk * job->slots, length = 0;
  char *ring = NULL;
  double t0 = now();
  if (events == NULL || armed == NULL) {
    fail(job, ERR_MEMORY, -1, 0, ENOMEM, "out of memory");
    goto out;
  }
  if (cu) {
    if (!cuda_ok(job, cu->set_device(job->device), "cudaSetDevice")) goto out;
    if (!cuda_ok(job, cu->stream_create(&stream, 1 /* non-blocking */), "cudaStreamCreate")) goto out;
    for (int i = 0; i < job->slots; i++)
      if (!cuda_ok(job, cu->event_create(&events[i], 2 /* no timing */), "cudaEventCreate")) goto out;
  }
  ring = ring_alloc(job, ring_bytes, &base, &length);
  if (ring == NULL) goto out;
  r->alloc_s = now() - t0;

  int turn = 0;
  while (!atomic_load(&job->failed)) {
    int64_t e = atomic_fetch_add(&job->next, 1);
    if (e >= job->nextents) break;
    int f = job->ext_file[e];
    int64_t offset = job->ext_offset[e], n = job->ext_nbytes[e];
    int64_t p = job->ext_first_piece[e], pend = job->ext_first_piece[e + 1];
    double t = now();
    if (job->readahead && !resident(job, f, offset, n)) {
      posix_fadvise(job->file_fd[f], offset, n, POSIX_FADV_WILLNEED);
      r->hints++;
    }
    r->hint_s += now() - t;
    for (int64_t pos = 0; pos < n && !atomic_load(&job->failed);) {
      int64_t len = n - pos < job->chunk ? n - pos : job->chunk;
      char *slot = ring + (size_t)turn * job->chunk;
      t = now();
      if (armed[turn] && !cuda_ok(job, cu->event_sync(events[turn]), "cudaEventSynchronize")) break;
      double t1 = now();
      if (read_full(job, f, slot, len, offset + pos) != 0) break;
      double t2 = now();
      // Every piece part in [pos, pos + len): pieces are in extent order and disjoint.
      for (; p < pend && job->piece_offset[p] < pos + len; p++) {
        int64_t lo = job->piece_offset[p] > pos ? job->piece_offset[p] : pos;
        int64_t end = job->piece_offset[p] + job->piece_nbytes[p];
        int64_t hi = end < pos + len ? end : pos + len;
        void *dst = (void *)(uintptr_t)(job->piece_dst[p] + (lo - job->piece_offset[p]));
        if (cu) {
          if (!cuda_ok(job, cu->memcpy_async(dst, slot + (lo - pos), hi - lo, 1, stream), "cudaMemcpyAsync"))
            break;
        } else {
          memcpy(dst, slot + (lo - pos), hi - lo);
        }
        if (hi < end) break;  // the piece goes on in the next chunk
      }
      if (cu) {
        if (!cuda_ok(job, cu->event_record(events[turn], stream), "cudaEventRecord")) break;
        armed[turn] = 1;
      }
      turn = (turn + 1) % job->slots;
      pos += len;
      r->wait_s += t1 - t;
      r->read_s += t2 - t1;
      r->issue_s += now() - t2;
    }
    __atomic_fetch_add(job->done_bytes, n, __ATOMIC_RELAXED);
  }

out:
  if (cu) {
    if (stream) {
      cu->stream_sync(stream);  // the ring may be unmapped only once its copies are done
      cu->stream_destroy(stream);
    }
    for (int i = 0; events && i < job->slots; i++)
      if (events[i]) cu->event_destroy(events[i]);
    if (ring) cu->host_unregister(ring);
  }
  if (base) munmap(base, length);
  free(events);
  free(armed);
  return NULL;
}

#define LOAD(field, name)                                                  \
  do {                                                                     \
    *(void **)&cu->field = dlsym(lib, name);                               \
    if (!cu->field) {                                                      \
      snprintf(err, errlen, "the CUDA runtime %s has no %s", cudart, name); \
      return -1;                                                           \
    }                                                                      \
  } while (0)

static int load_cuda(struct cuda *cu, const char *cudart, char *err, int errlen) {
  void *lib = dlopen(cudart, RTLD_NOW | RTLD_GLOBAL);
  if (!lib) {
    snprintf(err, errlen, "dlopen(%s): %s", cudart, dlerror());
    return -1;
  }
  LOAD(memcpy_async, "cudaMemcpyAsync");
  LOAD(stream_create, "cudaStreamCreateWithFlags");
  LOAD(stream_sync, "cudaStreamSynchronize");
  LOAD(stream_destroy, "cudaStreamDestroy");
  LOAD(event_create, "cudaEventCreateWithFlags");
  LOAD(event_record, "cudaEventRecord");
  LOAD(event_sync, "cudaEventSynchronize");
  LOAD(event_destroy, "cudaEventDestroy");
  LOAD(set_device, "cudaSetDevice");
  LOAD(host_register, "cudaHostRegister");
  LOAD(host_unregister, "cudaHostUnregister");
  LOAD(error_string, "cudaGetErrorString");
  return 0;
}

// Returns 0, or -1 with err / err_info set. timings (seconds, summed over readers):
// [alloc, read, wait, issue, hint, hinted extents].
int rtp_ring_load(const char *cudart, int device, int nfiles, const int32_t *file_fd, const int64_t *file_size,
                  int64_t nextents, const int32_t *ext_file, const int64_t *ext_offset, const int64_t *ext_nbytes,
                  const int64_t *ext_first_piece, const int64_t *piece_offset, const int64_t *piece_nbytes,
                  const uint64_t *piece_dst, int threads, int64_t chunk, int slots, int readahead,
                  int64_t *done_bytes, double *timings, int64_t *err_info, char *err, int errlen) {
  struct cuda cu;
  struct job job = {
      .file_fd = file_fd,
      .file_size = file_size,
      .ext_file = ext_file,
      .ext_offset = ext_offset,
      .ext_nbytes = ext_nbytes,
      .ext_first_piece = ext_first_piece,
      .piece_offset = piece_offset,
      .piece_nbytes = piece_nbytes,
      .piece_dst = piece_dst,
      .nextents = nextents,
      .chunk = chunk,
      .slots = slots,
      .device = device,
      .readahead = readahead,
      .cuda = NULL,
      .done_bytes = done_bytes,
      .err_info = err_info,
      .err = err,
      .errlen = errlen,
  };
  err_info[0] = 0;
  if (threads < 1 || slots < 1 || chunk < 4096 || chunk % 4096) {
    snprintf(err, errlen, "bad arguments: threads %d, slots %d, chunk %lld", threads, slots, (long long)chunk);
    return -1;
  }
  if (cudart != NULL) {
    if (load_cuda(&cu, cudart, err, errlen) != 0) return -1;
    job.cuda = &cu;
  }
  atomic_init(&job.next, 0);
  atomic_init(&job.failed, 0);
  pthread_mutex_init(&job.err_lock, NULL);
  job.maps = calloc(nfiles, sizeof(unsigned char *));
  struct reader *readers = calloc(threads, sizeof(struct reader));
  pthread_t *pool = calloc(threads, sizeof(pthread_t));
  int started = 0;
  if (!job.maps || !readers || !pool) {
    fail(&job, ERR_MEMORY, -1, 0, ENOMEM, "out of memory");
    goto out;
  }
  for (int f = 0; readahead && f < nfiles; f++) {
    void *m = file_size[f] > 0 ? mmap(NULL, file_size[f], PROT_READ, MAP_SHARED, file_fd[f], 0) : MAP_FAILED;
    job.maps[f] = m == MAP_FAILED ? NULL : m;
  }
  for (; started < threads; started++) {
    readers[started].job = &job;
    if (pthread_create(&pool[started], NULL, reader_main, &readers[started]) != 0) {
      fail(&job, ERR_MEMORY, -1, 0, errno, "cannot start reader thread: %s", strerror(errno));
      break;
    }
  }
out:
  for (int i = 0; i < started; i++) pthread_join(pool[i], NULL);
  for (int i = 0; i < 6; i++) timings[i] = 0;
  for (int i = 0; i < started; i++) {
    timings[0] += readers[i].alloc_s;
    timings[1] += readers[i].read_s;
    timings[2] += readers[i].wait_s;
    timings[3] += readers[i].issue_s;
    timings[4] += readers[i].hint_s;
    timings[5] += readers[i].hints;
  }
  for (int f = 0; job.maps && f < nfiles; f++)
    if (job.maps[f]) munmap(job.maps[f], file_size[f]);
  free(job.maps);
  free(readers);
  free(pool);
  pthread_mutex_destroy(&job.err_lock);
  return atomic_load(&job.failed) ? -1 : 0;
}
