/* Region decoding with libjpeg's scanline API, for benchmarks/partial_decode.py (compiled there with cc).
 *
 * decode_region decodes the rows [top, top + height) and columns [left, left + width) of a JPEG, given in
 * source pixels, at scale num/8: jpeg_crop_scanline narrows every output row to the iMCU columns that hold the
 * region, jpeg_skip_scanlines passes over the rows above it without the inverse DCT, colour conversion or
 * upsampling, and decoding stops after the region's last row. Entropy decoding cannot be skipped: Huffman
 * codes are read in sequence. The output rows start at the region's first row (scaled) and hold
 * *out_columns pixels from column *out_left, which jpeg_crop_scanline widens to iMCU boundaries. Returns 0,
 * or -1 when libjpeg reports an error.
 */
#include <setjmp.h>
#include <stdio.h>
#include <jpeglib.h>

struct guard {
    struct jpeg_error_mgr mgr;
    jmp_buf escape;
};

static void on_error(j_common_ptr info) { longjmp(((struct guard *)info->err)->escape, 1); }

int decode_region(const unsigned char *data, unsigned long size, int top, int left, int height, int width,
                  int num, unsigned char *out, int *out_left, int *out_columns) {
    struct jpeg_decompress_struct cinfo;
    struct guard err;
    cinfo.err = jpeg_std_error(&err.mgr);
    err.mgr.error_exit = on_error;
    if (setjmp(err.escape)) {
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, size);
    jpeg_read_header(&cinfo, TRUE);
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = num;
    cinfo.scale_denom = 8;
    jpeg_start_decompress(&cinfo);
    JDIMENSION x = (JDIMENSION)((long)left * num / 8);
    JDIMENSION x_end = (JDIMENSION)(((long)(left + width) * num + 7) / 8);
    JDIMENSION y = (JDIMENSION)((long)top * num / 8);
    JDIMENSION y_end = (JDIMENSION)(((long)(top + height) * num + 7) / 8);
    if (x_end > cinfo.output_width) x_end = cinfo.output_width;
    if (y_end > cinfo.output_height) y_end = cinfo.output_height;
    JDIMENSION columns = x_end - x;
    jpeg_crop_scanline(&cinfo, &x, &columns); /* widens to iMCU columns: x and columns come back changed */
    *out_left = (int)x;
    *out_columns = (int)columns;
    if (y > 0) jpeg_skip_scanlines(&cinfo, y);
    while (cinfo.output_scanline < y_end) {
        JSAMPROW row = out + (size_t)(cinfo.output_scanline - y) * columns * 3;
        jpeg_read_scanlines(&cinfo, &row, 1);
    }
    jpeg_abort_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    return 0;
}
