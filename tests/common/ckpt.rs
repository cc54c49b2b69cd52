//! A minimal writer of PyTorch zip checkpoints (`torch.save` format, pickle protocol 2, float32
//! tensors), so tests can produce `.ckpt` files without Python. Layout: `archive/data.pkl`,
//! `archive/data/<i>`, `archive/version`, `archive/byteorder`, as torch 1.6+ writes them.

use std::io::Write;
use std::path::Path;

fn unicode(out: &mut Vec<u8>, s: &str) {
    out.push(b'X');
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn int(out: &mut Vec<u8>, v: usize) {
    out.push(b'J');
    out.extend_from_slice(&(v as i32).to_le_bytes());
}

fn int_tuple(out: &mut Vec<u8>, v: &[usize]) {
    out.push(b'(');
    for &x in v {
        int(out, x);
    }
    out.push(b't');
}

/// Writes `tensors` (name, shape, values) as a torch checkpoint; with `lightning` the dict is
/// wrapped as `{"state_dict": {...}}` like a PyTorch Lightning checkpoint.
pub fn write_torch_checkpoint(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    lightning: bool,
) -> std::io::Result<()> {
    let mut pkl = vec![0x80, 0x02];
    pkl.push(b'}');
    if lightning {
        unicode(&mut pkl, "state_dict");
        pkl.push(b'}');
    }
    pkl.push(b'(');
    for (i, (name, shape, values)) in tensors.iter().enumerate() {
        assert_eq!(shape.iter().product::<usize>(), values.len(), "{name}");
        unicode(&mut pkl, name);
        pkl.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n");
        pkl.push(b'(');
        // persistent id: ('storage', torch.FloatStorage, key, 'cpu', numel)
        pkl.push(b'(');
        unicode(&mut pkl, "storage");
        pkl.extend_from_slice(b"ctorch\nFloatStorage\n");
        unicode(&mut pkl, &i.to_string());
        unicode(&mut pkl, "cpu");
        int(&mut pkl, values.len());
        pkl.push(b't');
        pkl.push(b'Q');
        int(&mut pkl, 0); // storage offset
        int_tuple(&mut pkl, shape);
        let mut strides = vec![1usize; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * shape[d + 1];
        }
        int_tuple(&mut pkl, &strides);
        pkl.push(0x89); // False (requires_grad)
        pkl.extend_from_slice(b"ccollections\nOrderedDict\n)R");
        pkl.push(b't');
        pkl.push(b'R');
    }
    pkl.push(b'u');
    if lightning {
        pkl.push(b's');
    }
    pkl.push(b'.');

    let file = std::fs::File::create(path)?;
    let mut zip = zip::ZipWriter::new(file);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let err = |e: zip::result::ZipError| std::io::Error::other(e);
    zip.start_file("archive/data.pkl", opts).map_err(err)?;
    zip.write_all(&pkl)?;
    for (i, (_, _, values)) in tensors.iter().enumerate() {
        zip.start_file(format!("archive/data/{i}"), opts)
            .map_err(err)?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        zip.write_all(&bytes)?;
    }
    zip.start_file("archive/version", opts).map_err(err)?;
    zip.write_all(b"3\n")?;
    zip.start_file("archive/byteorder", opts).map_err(err)?;
    zip.write_all(b"little")?;
    zip.finish().map_err(err)?;
    Ok(())
}
