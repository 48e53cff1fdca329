"""The web demo's one page: type, attach images, see text and images back, interleaved.

It talks to ``POST /api/chat`` (``{"text", "images": [data URLs]}`` -> ``{"parts"}``) and ``POST /api/reset``;
every error the server answers carries a message the page shows.
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>MIM - TextBind demo</title>
<style>
body{font-family:system-ui,sans-serif;max-width:820px;margin:2em auto;padding:0 1em;color:#222}
#log{border:1px solid #ccc;border-radius:8px;padding:1em;min-height:240px;margin-bottom:1em}
.turn{margin:.6em 0}.user{color:#0b4f8a}.assistant{color:#1c5e20}
.turn img{max-width:256px;display:block;margin:.4em 0;border-radius:6px}
#error{color:#b00020;min-height:1.2em}#notice{color:#6a4a00}
textarea{width:100%;box-sizing:border-box}
</style></head><body>
<h1>MIM</h1><p>Multi-turn interleaved multimodal chat (TextBind). Attach images, ask, and the
assistant answers with text and images.</p>
<div id="log"></div><div id="notice" role="status"></div><div id="error" role="alert"></div>
<form id="form"><textarea id="text" rows="3" placeholder="Your message"></textarea>
<input id="files" type="file" accept="image/*" multiple>
<button id="send" type="submit">Send</button> <button id="reset" type="button">New conversation</button></form>
<script>
const log=document.getElementById('log'),err=document.getElementById('error'),note=document.getElementById('notice');
function add(role,parts){const d=document.createElement('div');d.className='turn '+role;
 const who=document.createElement('b');who.textContent=role==='user'?'You: ':'MIM: ';d.appendChild(who);
 for(const p of parts){if(p.type==='text'){d.appendChild(document.createTextNode(p.text));}
  else{const i=document.createElement('img');i.src=p.src;i.alt=p.caption||'generated image';
   i.className=role==='assistant'?'generated':'uploaded';d.appendChild(i);}}
 log.appendChild(d);}
function read(f){return new Promise((ok,no)=>{const r=new FileReader();r.onload=()=>ok(r.result);r.onerror=no;r.readAsDataURL(f);});}
document.getElementById('form').addEventListener('submit',async e=>{e.preventDefault();err.textContent='';note.textContent='';
 const text=document.getElementById('text').value,files=[...document.getElementById('files').files];
 const images=await Promise.all(files.map(read));
 add('user',[{type:'text',text}].concat(images.map(src=>({type:'image',src}))));
 const button=document.getElementById('send');button.disabled=true;
 try{const r=await fetch('/api/chat',{method:'POST',headers:{'content-type':'application/json'},
   body:JSON.stringify({text,images})});
   let body;try{body=await r.json();}catch(x){body={error:'the server answered '+r.status+' without a message'};}
   note.textContent=body.notice||'';
   if(!r.ok){err.textContent=body.error;}else{add('assistant',body.parts);}}
 catch(x){err.textContent='request failed: '+x;}
 finally{button.disabled=false;document.getElementById('text').value='';document.getElementById('files').value='';}});
document.getElementById('reset').addEventListener('click',async()=>{await fetch('/api/reset',{method:'POST'});
 log.innerHTML='';err.textContent='';});
</script></body></html>"""
