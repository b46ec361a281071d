/*
 * The helper pod's command of the one-node cluster's storage provisioner (rancher's
 * local-path-provisioner, run by scripts/kube_node.py): creates or removes one volume's
 * folder on the node. The provisioner runs it in a pod with the node's volume folder mounted
 * and passes `-a create|delete` and the folder in VOL_DIR (and as `-p`). Compiled statically
 * by scripts/k8s-tools into a one-file image, so that the node needs no shell image.
 *
 *   create: the folder, mode 0777 (a hostPath volume gets no fsGroup: any pod user writes)
 *   delete: the folder and everything in it (not following symbolic links)
 */
#define _XOPEN_SOURCE 700
#include <errno.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int remove_one(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
  (void)st; (void)flag; (void)ftw;
  if (remove(path) != 0 && errno != ENOENT) {
    fprintf(stderr, "local-path-helper: remove %s: %s\n", path, strerror(errno));
    return -1;
  }
  return 0;
}

static int make_dirs(char *path) {
  for (char *p = path + 1; *p; p++) {
    if (*p != '/') continue;
    *p = '\0';
    int failed = mkdir(path, 0755) != 0 && errno != EEXIST;
    *p = '/';
    if (failed) return -1;
  }
  if (mkdir(path, 0777) != 0 && errno != EEXIST) return -1;
  return chmod(path, 0777); /* whatever the umask */
}

int main(int argc, char **argv) {
  const char *action = NULL, *mode = getenv("VOL_MODE");
  char *dir = getenv("VOL_DIR");
  for (int i = 1; i + 1 < argc; i += 2) {
    if (strcmp(argv[i], "-a") == 0) action = argv[i + 1];
    else if (strcmp(argv[i], "-p") == 0 && dir == NULL) dir = argv[i + 1];
    else if (strcmp(argv[i], "-m") == 0 && mode == NULL) mode = argv[i + 1];
  }
  if (action == NULL || dir == NULL || dir[0] != '/' || strlen(dir) < 2) {
    fprintf(stderr, "usage: VOL_DIR=/absolute/folder local-path-helper -a create|delete\n");
    return 2;
  }
  if (mode != NULL && mode[0] != '\0' && strcmp(mode, "Filesystem") != 0) {
    fprintf(stderr, "local-path-helper: volume mode %s is not supported\n", mode);
    return 2;
  }
  if (strcmp(action, "create") == 0) {
    if (make_dirs(dir) != 0) {
      fprintf(stderr, "local-path-helper: mkdir %s: %s\n", dir, strerror(errno));
      return 1;
    }
    printf("local-path-helper: created %s\n", dir);
    return 0;
  }
  if (strcmp(action, "delete") == 0) {
    if (nftw(dir, remove_one, 16, FTW_DEPTH | FTW_PHYS) != 0 && errno != ENOENT) return 1;
    printf("local-path-helper: removed %s\n", dir);
    return 0;
  }
  fprintf(stderr, "local-path-helper: unknown action %s\n", action);
  return 2;
}
