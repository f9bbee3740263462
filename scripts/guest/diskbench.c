/*
 * diskbench: the guest side of `aperture bench`. Measures block-device read
 * throughput from inside the guest without forking per I/O (busybox has no fio, and
 * under TCG a dd per read would measure fork, not I/O). Built on the host with
 *   gcc -static -O2 -o diskbench scripts/guest/diskbench.c
 * and put into the bench initramfs as /bin/diskbench (scripts/bench-init.sh runs it).
 *
 * usage: diskbench [-s SECONDS] [-w WARMUP_SECONDS] [-S SEED] [DEVICE]
 *   DEVICE defaults to /dev/vda; SECONDS (timed part of each workload) to 10,
 *   WARMUP_SECONDS (untimed part before each) to 1, SEED to 1.
 *
 * Workloads, each an untimed warm-up followed by a timed run of SECONDS:
 *   randread4k: one 4 KiB pread at a time (queue depth 1), O_DIRECT, at 4 KiB-aligned
 *               offsets drawn by a fixed-seed xorshift64* over the whole device;
 *   seqread1m:  one 1 MiB pread at a time, O_DIRECT, from offset 0 upwards, wrapping
 *               at the end of the device.
 * Each read must return the full length; any error ends the program with status 1.
 *
 * Output, one line each on stdout (the host greps '^APERTURE-BENCH '):
 *   APERTURE-BENCH device <path> bytes=<size>
 *   APERTURE-BENCH begin <workload>          after the warm-up, just before timing
 *   APERTURE-BENCH randread4k iops=<f> ops=<n> seconds=<f> requests=<n>
 *   APERTURE-BENCH seqread1m mibps=<f> mib=<n> seconds=<f> requests=<n>
 *   APERTURE-BENCH error <what>: <strerror>
 * `requests` is the device's completed read requests over the timed run, from
 * /sys/block/<dev>/stat (field 1): what the block layer sent the device, after splits
 * and merges.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define SMALL 4096u
#define LARGE (1u << 20)

static const char *dev_path = "/dev/vda";
static char stat_path[256];

static void fail(const char *what)
{
	printf("APERTURE-BENCH error %s: %s\n", what, strerror(errno));
	fflush(stdout);
	exit(1);
}

static double now(void)
{
	struct timespec ts;
	if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
		fail("clock_gettime");
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Read requests the device completed so far (/sys/block/DEV/stat, field 1). */
static uint64_t reads_completed(void)
{
	FILE *f = fopen(stat_path, "r");
	unsigned long long n = 0;
	if (!f)
		return 0;
	if (fscanf(f, "%llu", &n) != 1)
		n = 0;
	fclose(f);
	return n;
}

/* xorshift64*: cheap, deterministic, good enough to scatter offsets. */
static uint64_t rng_state;
static uint64_t next_rand(void)
{
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 0x2545f4914f6cdd1dULL;
}

static void read_full(int fd, void *buf, size_t len, uint64_t off)
{
	ssize_t n = pread(fd, buf, len, (off_t)off);
	if (n < 0)
		fail("pread");
	if ((size_t)n != len) {
		errno = EIO;
		fail("short pread");
	}
}

/* Random 4 KiB reads for `secs` seconds; returns the count. */
static uint64_t randread(int fd, void *buf, uint64_t blocks, double secs)
{
	uint64_t ops = 0;
	double end = now() + secs;
	do {
		read_full(fd, buf, SMALL, (next_rand() % blocks) * SMALL);
		ops++;
	} while (now() < end);
	return ops;
}

/* Sequential 1 MiB reads for `secs` seconds from *pos; returns the count. */
static uint64_t seqread(int fd, void *buf, uint64_t size, uint64_t *pos, double secs)
{
	uint64_t ops = 0;
	double end = now() + secs;
	do {
		if (*pos + LARGE > size)
			*pos = 0;
		read_full(fd, buf, LARGE, *pos);
		*pos += LARGE;
		ops++;
	} while (now() < end);
	return ops;
}

/* Gives the host a moment to sample its counters after a marker line. */
static void begin(const char *workload)
{
	printf("APERTURE-BENCH begin %s\n", workload);
	fflush(stdout);
	usleep(200 * 1000);
}

int main(int argc, char **argv)
{
	double secs = 10, warm = 1;
	uint64_t seed = 1;
	int c;
	while ((c = getopt(argc, argv, "s:w:S:")) != -1) {
		switch (c) {
		case 's': secs = strtod(optarg, NULL); break;
		case 'w': warm = strtod(optarg, NULL); break;
		case 'S': seed = strtoull(optarg, NULL, 0); break;
		default:
			fprintf(stderr, "usage: %s [-s SECONDS] [-w WARMUP_SECONDS] [-S SEED] [DEVICE]\n", argv[0]);
			return 2;
		}
	}
	if (optind < argc)
		dev_path = argv[optind];
	if (!(secs > 0) || warm < 0) {
		errno = EINVAL;
		fail("seconds");
	}
	rng_state = seed ? seed : 1;
	{
		char tmp[200];
		snprintf(tmp, sizeof(tmp), "%s", dev_path);
		snprintf(stat_path, sizeof(stat_path), "/sys/block/%s/stat", basename(tmp));
	}

	int fd = open(dev_path, O_RDONLY | O_DIRECT);
	if (fd < 0)
		fail("open");
	uint64_t size = 0;
	struct stat st;
	if (fstat(fd, &st) != 0)
		fail("fstat");
	if (S_ISREG(st.st_mode))
		size = (uint64_t)st.st_size; /* a plain file, for trying it on the host */
	else if (ioctl(fd, BLKGETSIZE64, &size) != 0)
		fail("BLKGETSIZE64");
	if (size < LARGE) {
		errno = ENOSPC;
		fail("device smaller than 1 MiB");
	}
	printf("APERTURE-BENCH device %s bytes=%" PRIu64 "\n", dev_path, size);
	fflush(stdout);

	void *small, *large;
	if (posix_memalign(&small, SMALL, SMALL) != 0 || posix_memalign(&large, SMALL, LARGE) != 0) {
		errno = ENOMEM;
		fail("posix_memalign");
	}
	/* Touch the buffers so page faults are not part of the timed reads. */
	memset(small, 0, SMALL);
	memset(large, 0, LARGE);

	uint64_t blocks = size / SMALL;
	if (warm > 0)
		randread(fd, small, blocks, warm);
	begin("randread4k");
	uint64_t r0 = reads_completed();
	double t0 = now();
	uint64_t ops = randread(fd, small, blocks, secs);
	double dt = now() - t0;
	uint64_t r1 = reads_completed();
	printf("APERTURE-BENCH randread4k iops=%.1f ops=%" PRIu64 " seconds=%.3f requests=%" PRIu64 "\n",
	       (double)ops / dt, ops, dt, r1 - r0);
	fflush(stdout);

	uint64_t pos = 0;
	if (warm > 0)
		seqread(fd, large, size, &pos, warm);
	begin("seqread1m");
	r0 = reads_completed();
	t0 = now();
	ops = seqread(fd, large, size, &pos, secs);
	dt = now() - t0;
	r1 = reads_completed();
	printf("APERTURE-BENCH seqread1m mibps=%.1f mib=%" PRIu64 " seconds=%.3f requests=%" PRIu64 "\n",
	       (double)ops / dt, ops, dt, r1 - r0);
	fflush(stdout);
	close(fd);
	return 0;
}
