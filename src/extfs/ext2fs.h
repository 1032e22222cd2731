/* What src/extfs binds from e2fsprogs' libext2fs (see build.rs). */
#include <ext2fs/ext2_fs.h>
#include <ext2fs/ext2fs.h>
